"""python -m torch_impl.plot: metrics.jsonl of training runs as one PNG."""

from __future__ import annotations

import json

import pytest

from torch_impl.tools.plot import PlotError, load_metrics, main, series, with_time

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, lines):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                                                for line in lines))
    return path


RECORDS = [
    {"type": "val", "step": 0, "val_loss": 5.5, "val_bpb": 8.0},
    {"type": "train", "step": 1, "loss": 5.0, "lr_multiplier": 1.0, "muon_momentum": 0.85, "dt": 0.5,
     "tokens_per_s": 1000.0, "mfu": None},
    {"type": "train", "step": 2, "loss": 4.0, "lr_multiplier": 0.5, "muon_momentum": 0.9, "dt": 0.25,
     "tokens_per_s": 2000.0, "mfu": None},
    {"type": "val", "step": 2, "val_loss": 4.2, "val_bpb": 6.0},
    {"type": "summary", "step": 2, "val_bpb": 6.0},
]


def test_series_follow_the_file_by_step_and_by_training_time(tmp_path):
    runs = {"a": load_metrics(write_run(tmp_path / "a", RECORDS))}
    with_time(runs)
    r = runs["a"]
    assert series(r["train"], "loss", "step") == ([1, 2], [5.0, 4.0])
    assert series(r["train"], "loss", "time") == ([0.5, 0.75], [5.0, 4.0])  # cumulative dt
    assert series(r["val"], "val_bpb", "time") == ([0.0, 0.75], [8.0, 6.0])  # val at step 0: before any step
    assert series(r["train"], "mfu", "step") == ([], [])  # null values are not plotted


def test_one_run_writes_its_png_next_to_its_metrics(tmp_path, capsys):
    run = write_run(tmp_path / "run", RECORDS)
    assert main([str(run)]) == 0
    assert (run / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    assert list(run.glob(".metrics.png*")) == []  # no temporary file left


def test_two_runs_overlaid_and_a_torn_last_line_is_skipped(tmp_path, capsys):
    a = write_run(tmp_path / "a", RECORDS)
    b = write_run(tmp_path / "b", RECORDS + ['{"type": "train", "st'])  # killed mid-write
    out = tmp_path / "plots" / "cmp.png"
    assert main([str(a), str(b), "--x", "time", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert "skipped its last line" in capsys.readouterr().err
    assert len(load_metrics(b)["train"]) == 2


@pytest.mark.parametrize("case", ["missing run", "no training steps", "bad middle line", "out not png", "out a dir"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    run = tmp_path / "run"
    args = [str(run)]
    message = {"missing run": "no such file", "no training steps": "no training steps logged",
               "bad middle line": "metrics.jsonl:2: not a metrics record", "out not png": "must be a .png",
               "out a dir": "is a directory"}[case]
    if case == "no training steps":
        write_run(run, RECORDS[:1])
    elif case == "bad middle line":
        write_run(run, [RECORDS[0], "garbage\n", RECORDS[1]])
    elif case != "missing run":
        write_run(run, RECORDS)
        if case == "out a dir":
            (tmp_path / "x.png").mkdir()
        args += ["--out", str(tmp_path / ("x.pdf" if case == "out not png" else "x.png"))]
    if case in ("out not png", "out a dir"):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 2
    assert message in capsys.readouterr().err
    assert [p for p in tmp_path.rglob("*.png") if p.is_file()] == []


def test_load_metrics_names_the_line():
    with pytest.raises(PlotError, match="no such file"):
        load_metrics("/nonexistent/run")
