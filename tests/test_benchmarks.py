"""python -m benchmarks: the --quick smoke of every suite (CI), the results schema, --compare, bad input.

The smoke run checks that every suite runs, that results.json parses with the documented schema,
that every plot it lists exists as a PNG, and that numbers with a known exact value come out so
(sharded memory against its formulas, the spectra against the math). It never asserts a speed.
The suites run as a subprocess, as users run them (benchmarks/__init__ sets the OpenMP wait policy
before torch loads, which an in-process import here could not)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.compare import compare, compare_markdown
from benchmarks.compare import main as compare_main
from benchmarks.results import SCHEMA, ResultsError, Suite, Table, load_results, markdown, write_folder

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SUITE_TABLES = {"orthogonalize": {"time", "speed", "quality"}, "muon_step": {"step"}, "optimizer": {"time", "steps"},
                "distributed": {"steps"}, "sharding": {"schemes"}, "training": {"tokens", "steps"},
                "spectra": {"spectra"}}


def run_benchmarks(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = run_benchmarks("--quick", "--device", "cpu", "--out", str(out))  # the same suites with or without a GPU
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, load_results(out / "results.json")


def test_quick_run_writes_every_suite_with_its_tables_and_plots(quick_run):
    out, data = quick_run
    assert data["schema"] == SCHEMA and data["quick"] is True
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["omp_wait_policy"] == "PASSIVE"
    suites = {s["name"]: s for s in data["suites"]}
    assert list(suites) == list(SUITE_TABLES)
    for name, tables in SUITE_TABLES.items():
        s = suites[name]
        assert s["status"] == "ok", (name, s["reason"])
        assert {t["name"] for t in s["tables"]} == tables
        for t in s["tables"]:
            assert t["rows"], (name, t["name"])
            keys = {c["key"] for c in t["columns"]}
            assert set(t["key"]) <= keys and (t["metric"] is None or t["metric"] in keys), (name, t["name"])
        assert s["plots"], name
        for plot in s["plots"]:
            assert (out / plot).read_bytes()[:8] == PNG, plot
    listed = {p for s in data["suites"] for p in s["plots"]}
    assert {p.name for p in out.glob("*.png")} == listed
    report = (out / "report.md").read_text()
    assert all(f"## {name}" in report for name in SUITE_TABLES) and "## Methodology" in report
    assert "**" in report  # the best of each side-by-side row is marked


def test_quick_run_numbers_with_a_known_value(quick_run):
    _, data = quick_run
    tables = {(s["name"], t["name"]): t["rows"] for s in data["suites"] for t in s["tables"]}
    # Sharded memory (benchmarks/sharding.py formulas): the whole model on every ZeRO-2 rank and 1/N of it
    # under FSDP2 (width 128 and depth 2 split evenly over N = 2, so no padding), state (M + 2A)/N: exact.
    for r in tables[("sharding", "schemes")]:
        assert r["params_MB"] == pytest.approx(r["theory_params_MB"], rel=1e-12), r
        assert r["state_MB"] == pytest.approx(r["theory_state_MB"], rel=1e-12), r
    # ZeRO-2 moves 2(N−1)/N of the padded bytes per rank by the optimizers' ring-model counters, plus the
    # non-finite flag all_reduce of a few scalars (measured 144 B per step; bound 1 kB).
    for r in tables[("distributed", "steps")]:
        if r["scheme"] == "dist":
            assert 0 <= r["sent_MB_per_rank"] - r["theory_MB_per_rank"] <= 1e-3, r
    # The same math in both frameworks: polar errors of torch eager and jax.jit agree to fp32 rounding
    # (relative 1e-3: the errors are ≥ 2e-4 and the fp32 outputs differ by ≤ 1e-5, tests/rounding_bounds.py).
    quality = {}
    for r in tables[("orthogonalize", "quality")]:
        quality.setdefault((r["input"], r["shape"], r["method"]), {})[r["implementation"]] = r["polar_error"]
    pairs = [q for q in quality.values() if {"torch eager", "jax.jit"} <= set(q)]
    assert len(pairs) == 2 * 2 * 7  # inputs × non-tall unstacked quick shapes × methods
    for q in pairs:
        assert q["jax.jit"] == pytest.approx(q["torch eager"], rel=1e-3), q
    spectra = {r["update"]: r for r in tables[("spectra", "spectra")]}
    # DeepSeek-V4's convergent tail: σ within 0.2% of 1 for σ/‖U‖_F ≥ 1e-4 (.specs/orthogonalizers.md §2.5),
    # so every σ lands in [0.99, 1.01]; NS5 maps σ into its band, max 1.2024 (the scalar map's maximum, §2.1).
    assert 0.99 <= spectra["deepseek_v4"]["sigma_min"] <= spectra["deepseek_v4"]["sigma_max"] <= 1.01
    assert spectra["newton_schulz"]["sigma_max"] <= 1.2025
    # the momentum matrix is far from orthogonal; NS5 raises its σ_min/σ_max by orders of magnitude
    assert spectra["momentum (Nesterov U)"]["ratio"] < 1e-2 < spectra["newton_schulz"]["ratio"]
    steps = {r["framework"]: r for r in tables[("training", "steps")]}
    assert set(steps) == {"torch", "jax (jit)"}
    assert 0 < steps["torch"]["orth_share"] < 1 and steps["torch"]["mfu"] > 0


def test_bad_input_is_reported_and_the_other_suites_still_run(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = ["spectra", "training", "nosuch", "--quick", "--compare", str(bad), "--out", str(tmp_path / "out")]
    no_gpu = not torch.cuda.is_available()
    proc = run_benchmarks(*args, *(["--device", "cuda"] if no_gpu else []))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown suite 'nosuch' (known: orthogonalize, muon_step" in proc.stderr
    assert f"--compare: {bad}: not JSON" in proc.stderr
    data = load_results(tmp_path / "out" / "results.json")
    suites = {s["name"]: s for s in data["suites"]}
    assert list(suites) == ["spectra", "training"] and data["compare"] is None
    assert suites["spectra"]["status"] == "ok"  # takes no --device: runs
    if no_gpu:
        assert "--device cuda: no CUDA device is visible here" in proc.stderr
        assert suites["training"]["status"] == "skipped" and "no CUDA device" in suites["training"]["reason"]


def test_a_missing_optional_framework_skips_its_suites_only(tmp_path):
    fake = tmp_path / "nojax" / "jax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'jax'\", name='jax')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    proc = run_benchmarks("orthogonalize", "spectra", "--quick", "--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    suites = {s["name"]: s for s in load_results(tmp_path / "out" / "results.json")["suites"]}
    assert suites["orthogonalize"]["status"] == "skipped" and "needs jax" in suites["orthogonalize"]["reason"]
    assert suites["spectra"]["status"] == "ok"
    assert "orthogonalize: skipped (needs jax" in proc.stderr


def test_a_suite_that_raises_is_reported_failed_and_the_others_run(tmp_path, monkeypatch):
    import benchmarks.__main__ as runner
    import benchmarks.spectra as spectra

    def boom(args):
        raise RuntimeError("planted failure")
    monkeypatch.setattr(spectra, "measure", boom)
    monkeypatch.setitem(runner.SUITES, "spectra_twice", ("benchmarks.spectra", "the planted one"))
    assert runner.main(["spectra_twice", "--quick", "--out", str(tmp_path)]) == 1
    (suite,) = load_results(tmp_path / "results.json")["suites"]
    assert suite["status"] == "failed" and suite["reason"] == "RuntimeError: planted failure"


def test_a_suite_with_broken_imports_fails_and_a_missing_extra_skips(tmp_path, monkeypatch):
    import benchmarks.__main__ as runner

    broken = tmp_path / "mods" / "broken_suite.py"
    broken.parent.mkdir()
    broken.write_text("from json import no_such_name\n")  # our bug, not a missing optional framework
    (tmp_path / "mods" / "needs_optax_suite.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'optax.contrib'\", name='optax.contrib')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.setitem(runner.SUITES, "broken", ("broken_suite", "a suite with a bad import"))
    monkeypatch.setitem(runner.SUITES, "needs_optax", ("needs_optax_suite", "a suite needing optax"))
    assert runner.main(["broken", "needs_optax", "--out", str(tmp_path / "out")]) == 1
    suites = {s["name"]: s for s in load_results(tmp_path / "out/results.json")["suites"]}
    assert suites["broken"]["status"] == "failed" and "no_such_name" in suites["broken"]["reason"]
    assert suites["needs_optax"]["status"] == "skipped" and suites["needs_optax"]["reason"].startswith("needs optax")


def test_compare_after_a_run_lands_in_its_results_and_report(tmp_path, monkeypatch):
    import benchmarks.__main__ as runner
    import benchmarks.spectra as spectra

    ms = iter([10.0, 10.5, 20.0])
    table = lambda: Table("t", "T", [("impl", "impl"), ("ms", "ms")], [dict(impl="x", ms=next(ms))], key=("impl",),
                          metric="ms")
    monkeypatch.setattr(spectra, "measure", lambda args: Suite("spectra", [table()]))
    assert runner.main(["spectra", "--out", str(tmp_path / "old")]) == 0
    for out, verdict in (("same", "same"), ("slower", "regression")):  # 10 → 10.5 (+5%), then 10 → 20
        assert runner.main(["spectra", "--out", str(tmp_path / out), "--compare", str(tmp_path / "old/results.json"),
                            "--threshold", "0.1"]) == 0
        (row,) = load_results(tmp_path / out / "results.json")["compare"]["rows"]
        assert row["verdict"] == verdict and row["suite"] == "spectra" and row["row"] == "x"
    assert "| spectra | t | x | ms | 10 | 20 | 2 | regression |" in (tmp_path / "slower/report.md").read_text()


# ---- the schema and --compare on hand-made results -------------------------------------------------

def results(tmp_path, name, rows, metric="ms", lower_is_better=True, machine_cpu=None):
    table = Table("t", "T", [("impl", "impl"), ("ms", "ms")], rows, key=("impl",), metric=metric,
                  lower_is_better=lower_is_better)
    data = write_folder(tmp_path / name, [Suite("s", [table])], [], quick=True)
    if machine_cpu is not None:
        data["machine"]["cpu_model"] = machine_cpu
    return data


def test_compare_verdicts_follow_the_threshold_in_the_metric_direction(tmp_path):
    old = results(tmp_path, "old", [dict(impl=k, ms=100.0) for k in "abcdef"] + [dict(impl="g", ms=None)])
    new = results(tmp_path, "new", [dict(impl="a", ms=100.0), dict(impl="b", ms=110.0), dict(impl="c", ms=111.0),
                                    dict(impl="d", ms=90.0), dict(impl="e", ms=100 / 1.11), dict(impl="g", ms=5.0),
                                    dict(impl="h", ms=1.0)])
    got = {r["row"]: r["verdict"] for r in compare(old, new, 0.10)["rows"]}
    # 110/100 = 1.1 is not > 1 + 0.1; 90/100 = 0.9 is not < 1/1.1 = 0.909...: the boundary is the threshold
    assert got == {"a": "same", "b": "same", "c": "regression", "d": "improvement", "e": "improvement",
                   "f": "gone", "g": "not comparable", "h": "new"}
    higher = {r["row"]: r["verdict"] for r in compare(
        results(tmp_path, "o2", [dict(impl="x", ms=100.0), dict(impl="y", ms=100.0)], lower_is_better=False),
        results(tmp_path, "n2", [dict(impl="x", ms=120.0), dict(impl="y", ms=80.0)], lower_is_better=False),
        0.10)["rows"]}
    assert higher == {"x": "improvement", "y": "regression"}
    untracked = compare(results(tmp_path, "o3", [dict(impl="x", ms=1.0)], metric=None),
                        results(tmp_path, "n3", [dict(impl="x", ms=9.0)], metric=None))
    assert untracked["rows"] == []
    with pytest.raises(ValueError, match="threshold must be > 0"):
        compare(old, new, 0.0)


def test_compare_keeps_changes_within_the_runs_spread_and_defaults_the_threshold_by_kind(tmp_path):
    def run(name, ms, lo, hi, quick):
        table = Table("t", "T", [("impl", "impl"), ("ms", "ms")], [dict(impl="x", ms=ms, lo=lo, hi=hi)],
                      key=("impl",), metric="ms", spread=("lo", "hi"))
        return write_folder(tmp_path / name, [Suite("s", [table])], [], quick)
    verdict = lambda old, new, t=None: compare(old, new, t)["rows"][0]["verdict"]
    base = run("a", 10.0, 9.0, 12.0, quick=False)
    # +30% on the median, but the new [min, max] reaches into the old one: noise, not a regression
    assert verdict(base, run("b", 13.0, 11.5, 14.0, quick=False)) == "same"
    assert verdict(base, run("c", 13.0, 12.5, 14.0, quick=False)) == "regression"  # disjoint: +30% > 10%
    # the default threshold: 0.1 between full runs, 0.5 when either is quick (compare.py's measurement)
    assert compare(base, run("d", 10.0, 9.0, 12.0, quick=False))["threshold"] == 0.1
    quick_old, quick_new = run("e", 10.0, 9.5, 10.5, quick=True), run("f", 14.0, 13.5, 14.5, quick=True)
    assert compare(quick_old, quick_new)["threshold"] == 0.5 and verdict(quick_old, quick_new) == "same"
    assert verdict(quick_old, quick_new, 0.1) == "regression"


def test_compare_does_not_match_rows_of_runs_with_other_settings(tmp_path):
    table = lambda ms: Table("t", "T", [("impl", "impl"), ("ms", "ms")], [dict(impl="x", ms=ms)], key=("impl",),
                             metric="ms")
    old = write_folder(tmp_path / "o", [Suite("s", [table(1.0)], config=dict(width=256, device="cpu"))], [], True)
    new = write_folder(tmp_path / "n", [Suite("s", [table(9.0)], config=dict(width=768, device="cpu"))], [], False)
    c = compare(old, new)
    assert [r["verdict"] for r in c["rows"]] == ["settings differ"]  # not a 9x "regression"
    assert c["settings_differ"] == {"s": "width: 256 → 768"}
    assert "**s: run with other settings** (width: 256 → 768)" in compare_markdown(c)


def test_compare_warns_when_the_machines_differ(tmp_path):
    c = compare(results(tmp_path, "o", [dict(impl="x", ms=1.0)], machine_cpu="EPYC"),
                results(tmp_path, "n", [dict(impl="x", ms=2.0)], machine_cpu="Xeon"))
    assert c["machine_differs"] == ["cpu_model: EPYC → Xeon"]
    assert "Different machine or versions" in compare_markdown(c) and "| regression |" in compare_markdown(c)


def test_compare_command_exit_status(tmp_path, capsys):
    results(tmp_path, "old", [dict(impl="x", ms=1.0)])
    results(tmp_path, "same", [dict(impl="x", ms=1.0)])
    results(tmp_path, "slow", [dict(impl="x", ms=2.0)])
    assert compare_main([str(tmp_path / "old/results.json"), str(tmp_path / "same/results.json")]) == 0
    assert compare_main([str(tmp_path / "old/results.json"), str(tmp_path / "slow/results.json")]) == 1
    assert compare_main([str(tmp_path / "old/results.json"), str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    (None, "cannot read"),
    ("[1, 2", "not JSON"),
    ('{"schema": "other/v9", "suites": []}', "not a benchmark results file (schema 'other/v9'"),
    (f'{{"schema": "{SCHEMA}", "suites": {{}}}}', "'suites' must be a list"),
    (f'{{"schema": "{SCHEMA}", "suites": [{{"tables": []}}]}}', "suites[0] needs a 'name'"),
    (f'{{"schema": "{SCHEMA}", "suites": [{{"name": "s", "tables": [{{"name": "t", "rows": [1]}}]}}]}}',
     "suites[0] (s) tables[0]: needs 'name', 'rows' (objects)"),
])
def test_load_results_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "r.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ResultsError, match=re.escape("r.json: " + message)):
        load_results(path)


def test_report_marks_the_best_of_each_row_in_the_metric_direction():
    t = Table("t", "T", [("k", "k"), ("a", "a"), ("b", "b")], [dict(k="r1", a=2.0, b=1.0), dict(k="r2", a=1.0, b=None)],
              best=("a", "b"))
    assert markdown(t).splitlines()[2:] == ["| r1 | 2 | **1** |", "| r2 | **1** |  |"]
    t.lower_is_better = False
    assert markdown(t).splitlines()[2] == "| r1 | **2** | 1 |"


def test_results_json_round_trips(tmp_path):
    data = results(tmp_path, "r", [dict(impl="x", ms=1.5)])
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == data


def test_gpu_summary_reads_the_goals_from_a_check_folder(tmp_path):
    from benchmarks.gpu_summary import main as summary_main
    from benchmarks.gpu_summary import summary

    speed = [dict(shape=s, dtype=d, method=m, implementation=i, ms=1.0, gflops=600e3, pct_matmul=p)
             for s, d, m, i, p in [("768x3072", "bfloat16", "newton_schulz", "torch eager", 80.0),
                                   ("1280x5120", "bfloat16", "newton_schulz", "torch eager", 91.0),
                                   ("1280x5120", "float32", "newton_schulz", "torch eager", 99.0),  # not bf16
                                   ("1280x5120", "bfloat16", "polar_express", "torch eager", 99.0)]]  # not NS5
    table = Table("speed", "S", [("shape", "shape")], speed)
    write_folder(tmp_path / "orthogonalize", [Suite("orthogonalize", [table])], [], quick=False)
    (tmp_path / "stages.txt").write_text("cuda_tests: passed in 90 s\ntrain_d12: timed out after 150s in 150 s\n")
    (tmp_path / "train_d12").mkdir()
    recs = [dict(type="train", step=s, mfu=0.05 if s < 10 else 0.40 + 0.01 * (s % 3), tokens_per_s=1e5)
            for s in range(20)] + [dict(type="val", step=20, val_bpb=2.0)]
    (tmp_path / "train_d12/metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    md, met = summary(tmp_path)
    # the best bf16 NS5 row (91%) counts, not fp32 or another method; MFU median of steps 10..19 (0.41)
    assert met == {"ns_bf16": True, "d12_mfu": False}
    assert "Best 91%: goal met." in md and "MFU 41.0%" in md and "steps 10–19" in md
    assert "| train_d12 | timed out after 150s in 150 s |" in md
    (tmp_path / "train_d12/metrics.jsonl").unlink()
    md, met = summary(tmp_path)
    assert met == {"ns_bf16": True} and "d12 training metrics missing (FileNotFoundError" in md
    assert summary_main([str(tmp_path / "nope")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the whole check")
def test_gpu_check_without_a_gpu_exits_2_and_writes_nothing(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "error: no CUDA GPU visible" in proc.stderr
    assert not (tmp_path / "out").exists()
