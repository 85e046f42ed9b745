"""One process, no process group: `python -m torch_impl.train` learns, checkpoints, and its checkpoint
feeds the sample CLI. One short training run (conftest.py's session fixture `trained`) serves every
test here and the export parity test (parity_tests/test_export_parity.py)."""

import math

import numpy as np
import pytest

from tests.train.common import TINY, TRAINED_ARGS, TRAINED_STEPS, check, metrics, run, tree
from torch_impl.training.checkpoint import load_model
from torch_impl.training.generate import generate_text
from torch_impl.training.main import main

STEPS = TRAINED_STEPS
ARGS = TRAINED_ARGS


def test_loss_decreases(trained):
    out_dir, _ = trained
    train = metrics(out_dir, "train")
    val = metrics(out_dir, "val")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in val] == [0, 20, 40]
    # the zero-initialised lm_head starts at exactly uniform logits: loss ln(257)
    assert train[0]["loss"] == pytest.approx(math.log(257), abs=1e-3)
    last = np.mean([r["loss"] for r in train[-5:]])
    assert last < train[0]["loss"] - 1.5, [r["loss"] for r in train]
    assert val[-1]["val_bpb"] < 0.7 * val[0]["val_bpb"], val


def test_outputs(trained):
    out_dir, proc = trained
    assert (out_dir / "config.json").is_file()
    ckpt = out_dir / "checkpoints" / f"step_{STEPS:06d}"
    for name in ("meta.json", "model/.metadata", "optimizer", "rng/rank0.pt", "tokenizer_meta.json"):
        assert (ckpt / name).exists(), name
    assert [p.name for p in (out_dir / "checkpoints").iterdir()] == [ckpt.name]  # no temp dirs left
    summary = metrics(out_dir, "summary")
    assert len(summary) == 1 and summary[0]["steps_run"] == STEPS and summary[0]["val_bpb"] > 0
    train = metrics(out_dir, "train")[0]
    assert set(train) >= {"step", "loss", "lr_multiplier", "muon_momentum", "dt", "tokens_per_s", "mfu"}
    assert train["mfu"] is None  # no known peak on CPU
    assert "step    40/40 | loss" in proc.stdout and "sample:" in proc.stdout


def test_sample_cli(trained):
    out_dir, _ = trained
    proc = check(run(["-m", "torch_impl.sample", "--checkpoint", str(out_dir), "--prompt", "def ",
                      "--max-tokens", "60", "--seed", "1"]))
    text = proc.stdout.rstrip("\n")
    assert text.startswith("def ") and len(text[4:].split()) >= 3, text
    # the same continuation in-process: seeded sampling is deterministic
    model, tok, _ = load_model(out_dir)
    assert text == "def " + generate_text(model, tok, "def ", 60, seed=1)


def call(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_resume_with_another_config_fails_and_writes_nothing(trained, capsys):
    out_dir, _ = trained
    before = tree(out_dir)
    argv = [*ARGS, "--out-dir", str(out_dir), "--resume"]
    code, err = call([*argv[:1], "3", *argv[2:]], capsys)  # --depth 3
    assert code == 2 and "different model" in err and "n_layer: checkpoint 2 vs now 3" in err
    code, err = call([*argv, "--val-fraction", "0.3"], capsys)  # another train split
    assert code == 2 and "token stream" in err
    code, err = call([*argv, "--optimizer", "adamw"], capsys)
    assert code == 2 and "--optimizer hybrid" in err
    assert tree(out_dir) == before


def test_fresh_run_into_existing_run_refused(trained, capsys):
    out_dir, _ = trained
    before = tree(out_dir)
    code, err = call([*ARGS, "--out-dir", str(out_dir)], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert tree(out_dir) == before


def test_resume_of_finished_run_is_a_no_op(trained, capsys):
    out_dir, _ = trained
    before = tree(out_dir)
    code, out = call([*ARGS, "--out-dir", str(out_dir), "--resume"], capsys)
    assert code == 0 and "nothing to do" in out
    assert tree(out_dir) == before


def test_adamw_only_with_bpe_stops_and_resumes(tmp_path, capsys):
    # the other optimizer and tokenizer paths, in-process: a BPE tokenizer trained at the start must come
    # back from the checkpoint (not be retrained) for the resumed run to see the same token stream
    out_dir = tmp_path / "run"
    argv = [*TINY, "--steps", "4", "--optimizer", "adamw", "--tokenizer", "bpe", "--vocab-size", "320",
            "--out-dir", str(out_dir)]
    assert main([*argv, "--stop-at", "2"]) == 0
    assert (out_dir / "checkpoints" / "step_000002" / "tokenizer.json").is_file()
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    train = metrics(out_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # zero-init lm_head: step 1's logits are exactly 0, loss ln(vocab) up to fp32 mean rounding
    assert train[0]["loss"] == pytest.approx(math.log(320), abs=1e-3)
    assert train[-1]["loss"] < train[0]["loss"]
    model, tok, meta = load_model(out_dir)
    assert tok.kind == "bpe" and tok.vocab_size == model.config.vocab_size == 320
    assert meta["args"]["optimizer"] == "adamw"


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_export_to_a_bad_path_exits_2_and_writes_nothing(trained, tmp_path, capsys, where):
    """Checked before the checkpoint is loaded; no hidden temporary file is left behind."""
    from torch_impl.tools.export import main as export_main
    out_dir, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = tmp_path if where == "a directory" else blocker / "model.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main(["--checkpoint", str(out_dir), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("is a directory" in err or "not a writable directory" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
