"""Bad invocations of the training CLI: a clear message, exit code 2, and nothing written.

Most cases call torch_impl.training.main.main in-process (it never touches a process group without torchrun's
environment); one goes through torchrun with 2 ranks to check that the failure propagates there too.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_impl.training.main import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--steps", "2", "--max-corpus-bytes", "50000"]


def run_main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


def corpus_dir(tmp_path, files: dict[str, bytes]) -> str:
    d = tmp_path / "corpus"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return str(d)


def empty_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    return str(path)


CASES = {
    "unknown flag": (lambda t: ["--bogus"], "unrecognized arguments"),
    "invalid choice": (lambda t: ["--ns-dtype", "float16"], "invalid choice"),
    "zero2 and fsdp together": (lambda t: ["--sharding", "zero2", "--sharding=fsdp"], "--sharding given twice"),
    "two optimizers": (lambda t: ["--optimizer=adamw", "--optimizer", "hybrid"], "--optimizer given twice"),
    "steps and budget": (lambda t: ["--steps", "3", "--token-budget", "100"], "not allowed with"),
    "zero depth": (lambda t: ["--depth", "0"], "--depth must be >= 1"),
    "heads do not divide width": (lambda t: ["--n-embd", "100", "--n-head", "3"], "divisible by n_head"),
    "kv heads do not divide heads": (lambda t: ["--n-head", "4", "--n-kv-head", "3"], "must divide n_head"),
    "batch does not divide": (lambda t: ["--total-batch-size", "1000"], "not a multiple"),
    "missing data path": (lambda t: ["--data", str(t / "nope.txt")], "no such file or directory"),
    "empty corpus": (lambda t: ["--data", corpus_dir(t, {"a.txt": b"", "b.txt": b"  \n"})], "corpus is empty"),
    "binary corpus": (lambda t: ["--data", corpus_dir(t, {"a.bin": b"\x00\x01\x02" * 100})], "binary"),
    "not utf-8": (lambda t: ["--data", corpus_dir(t, {"a.txt": b"\xff\xfe caf\xe9" * 50})], "not valid UTF-8"),
    "one document": (lambda t: ["--data", corpus_dir(t, {"a.txt": b"hello " * 100})], "single text file"),
    "parquet without text": (lambda t: ["--data", empty_parquet(t)], "no 'text' column"),
    "corpus too small for a batch": (lambda t: ["--seq-len", "4096", "--device-batch-size", "64"],
                                     "fewer than one micro-batch"),
    "stop after end": (lambda t: ["--stop-at", "5"], "past the end"),
    "impossible schedule": (lambda t: ["--warmup-ratio", "0.9"], "warmup_ratio + warmdown_ratio"),
    "negative lr": (lambda t: ["--matrix-lr", "-1"], "--matrix-lr must be"),
    "lr overflows fp32": (lambda t: ["--embedding-lr", "1e39"], "overflows float32"),
    "out-dir is a file": (lambda t: ["--out-dir", str(a_file(t))], "is not a directory"),
    "out-dir under a file": (lambda t: ["--out-dir", str(a_file(t) / "run")], "is not a writable directory"),
    "small bpe vocab": (lambda t: ["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be"),
    "nothing to resume": (lambda t: ["--resume"], "no checkpoint"),
    "missing resume path": (lambda t: ["--resume", str(t / "nowhere")], "no such checkpoint"),
    "resume and overwrite": (lambda t: ["--resume", "--overwrite"], "contradict"),
    "bad device": (lambda t: ["--device", "tpu"], "--device must be"),
    "unsupported ns steps": (lambda t: ["--orthogonalizer", "cubic", "--ns-steps", "4"],
                             "orthogonalizer 'cubic': ns_steps: schedule 'cubic' supports steps = 5 only, got steps=4"),
    "too few deepseek steps": (lambda t: ["--orthogonalizer", "deepseek_v4", "--ns-steps", "5"], "steps >= 10"),
    "zero ns steps": (lambda t: ["--ns-steps", "0"], "supports steps >= 1, got steps=0"),
    "gram fp16 overflow": (lambda t: ["--orthogonalizer", "gram_newton_schulz", "--ns-steps", "15",
                                      "--ns-dtype", "bfloat16"], "past float16's range"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    make_args, message = CASES[case]
    out_dir = tmp_path / "run"
    code, err = run_main([*TINY, "--out-dir", str(out_dir), *make_args(tmp_path)], capsys)
    assert code == 2, err
    assert message in err, err
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    code, err = run_main([*TINY, "--out-dir", str(tmp_path / "run"), "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in err
    assert not (tmp_path / "run").exists()


def test_torchrun_two_ranks_bad_data_fails(tmp_path):
    out_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "torch_impl.train",
         *TINY, "--out-dir", str(out_dir), "--data", str(tmp_path / "nope")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no such file or directory" in proc.stderr
    assert not out_dir.exists()


def test_orthogonalizer_flags_are_checked_only_when_muon_runs():
    """--optimizer adamw builds no Muon: its --orthogonalizer / --ns-steps are not refused (they would be
    with the hybrid, the `unsupported ns steps` case above)."""
    from torch_impl.training.config import TrainConfig, UsageError

    TrainConfig.from_argv(["--optimizer", "adamw", "--orthogonalizer", "cubic", "--ns-steps", "4"]).validate()
    with pytest.raises(UsageError, match="steps = 5 only"):
        TrainConfig.from_argv(["--orthogonalizer", "cubic", "--ns-steps", "4"]).validate()
