"""benchmarks.study: a CI smoke run of the whole pipeline (real trainer runs in-process, tables, figures,
results folder) at the smallest size, and its argument checks. The bpb numbers themselves are the
study's business; here they only have to be plausible."""

import json
import math

import pytest

from benchmarks.study import main

STEPS, EVAL_EVERY = 4, 2
# depth 1 (width 64), 2 x 32 tokens per step, 4 steps, one seed: ~1 s of training per run
TINY = ["--quick", "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--seeds", "1", "--depth", "1",
        "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "256", "--methods", "newton_schulz"]


def test_smoke_run_writes_a_results_folder(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == "benchmarks/results/v1"
    (suite,) = data["suites"]
    assert suite["status"] == "ok", suite["reason"]
    for name in ("study_bpb_vs_step.png", "study_bpb_vs_time.png"):
        assert name in suite["plots"]
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = {t["name"]: t for t in suite["tables"]}

    final = {r["config"]: r for r in tables["final"]["rows"]}
    assert set(final) == {"adamw", "newton_schulz"}
    for row in final.values():
        # Upper bound: the untrained model predicts uniformly, log2(257) ≈ 8.006 bits per byte (see below);
        # 4 small steps that left it more than a bit worse than that would be a broken optimizer. Lower
        # bound: cross-entropy is positive. Finite: neither run diverged.
        assert math.isfinite(row["bpb_mean"]) and 0 < row["bpb_min"] <= row["bpb_mean"] <= row["bpb_max"] < 9
        assert row["steps"] == STEPS and row["tokens"] == STEPS * 2 * 32
        assert row["train_s"] > 0 and row["tokens_per_s"] > 0
    assert final["newton_schulz"]["iterations"] == 5 and final["adamw"]["iterations"] is None

    # evaluations at steps 0, 2, 4 (start, every EVAL_EVERY, end) for 2 configs x 1 seed
    curves = tables["curves"]["rows"]
    assert len(curves) == 2 * (STEPS // EVAL_EVERY + 1)
    assert sorted({r["step"] for r in curves}) == [0, 2, 4]
    # step 0 is the same model for both configs (same seed, same init), and lm_head starts at zero, so
    # every logit is 0: a uniform prediction over 257 tokens, log2(257) bits for each (1-byte) token
    at_start = {r["val_bpb"] for r in curves if r["step"] == 0}
    assert len(at_start) == 1 and abs(at_start.pop() - math.log2(257)) < 1e-4


@pytest.mark.parametrize("argv, says", [
    (["--methods", "newton_schulz", "no_such_method"], "no_such_method"),
    (["--steps", "0"], "--steps"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was run or written
