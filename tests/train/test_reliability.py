"""Reliability of the training entry point (issue 10, first part): one command line that starts and
continues a run (`--resume auto`), checkpoint retention, a torn metrics line, the non-finite policy
as a flag with the step in the message, and a hung rank that ends the run within
--collective-timeout with a message naming the step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.common import REPO, TINY, check, env, metrics, run
from torch_impl.training.checkpoint import list_checkpoints
from torch_impl.training.main import main

ARGS = [*TINY, "--steps", "5", "--eval-every", "0"]


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in metrics(out_dir, "train")]


def test_resume_auto_starts_then_continues_bit_identically(tmp_path):
    """The same command line launched into an empty directory starts the run; launched again after
    a stop, it continues from the latest checkpoint; launched after the end, it has nothing to do.
    A directory a run left without any checkpoint (killed early) is started afresh."""
    straight, auto = tmp_path / "straight", tmp_path / "auto"
    check(run([*ARGS, "--out-dir", str(straight)]))
    first = check(run([*ARGS, "--out-dir", str(auto), "--resume", "auto", "--stop-at", "3"]))
    assert "resumed" not in first.stdout and [s for s, _ in list_checkpoints(auto)] == [3]
    second = check(run([*ARGS, "--out-dir", str(auto), "--resume", "auto"]))
    assert "resumed from" in second.stdout
    assert losses(auto) == losses(straight)  # exact float equality
    done = check(run([*ARGS, "--out-dir", str(auto), "--resume", "auto"]))
    assert "nothing to do" in done.stdout

    early = tmp_path / "early"  # a run that died before its first checkpoint: metrics, no checkpoint
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9.9}\n')
    check(run([*ARGS, "--out-dir", str(early), "--resume", "auto"]))
    assert losses(early) == losses(straight)


def test_keep_checkpoints_deletes_the_oldest(tmp_path):
    out = tmp_path / "run"
    check(run([*ARGS, "--out-dir", str(out), "--checkpoint-every", "1", "--keep-checkpoints", "2"]))
    assert [s for s, _ in list_checkpoints(out)] == [4, 5]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    check(run([*ARGS, "--out-dir", str(out), "--stop-at", "2"]))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "step": 3, "lo')  # a write cut short by a kill
    resumed = check(run([*ARGS, "--out-dir", str(out), "--resume"]))
    assert "dropped 1 unreadable line" in resumed.stdout
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]  # and the file parses again


class PoisonAt:
    """Make the loss NaN at one training step (micro-batch count), from inside the process."""

    def __init__(self, monkeypatch, at_call: int):
        from torch_impl.models import gpt
        forward, calls = gpt.GPT.forward, [0]

        def poisoned(model, idx, targets=None, **kw):
            out = forward(model, idx, targets, **kw)
            if targets is not None and model.training:
                calls[0] += 1
                if calls[0] == at_call:
                    return out * float("nan")
            return out

        monkeypatch.setattr(gpt.GPT, "forward", poisoned)


def test_nonfinite_raise_names_the_step_and_the_flag(tmp_path, monkeypatch, capsys):
    PoisonAt(monkeypatch, 3)
    code = main([*ARGS, "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: step 3: non-finite gradient in" in err and "--nonfinite skip" in err, err


def test_nonfinite_skip_skips_the_step_and_logs_it(tmp_path, monkeypatch, capsys):
    PoisonAt(monkeypatch, 3)
    out = tmp_path / "run"
    assert main([*ARGS, "--out-dir", str(out), "--nonfinite", "skip"]) == 0
    assert [r["step"] for r in metrics(out, "skipped")] == [3]
    assert len(metrics(out, "train")) == 5


def test_a_model_that_no_longer_depends_on_its_input_ends_the_run(tmp_path, capsys):
    """--matrix-lr 1e30 keeps every number finite but grows the residual stream to ~1e31: the final
    RMSNorm overflows, every logit is 0 and the loss is exactly ln(257) on every batch. That used to
    finish with exit 0 and a dead model; now the third identical loss ends the run naming the lrs."""
    code = main([*ARGS, "--steps", "8", "--matrix-lr", "1e30", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: step 5: the loss has been exactly 5.5490746"), err
    assert "no longer depends on its input" in err and "--matrix-lr 1e+30" in err, err


def test_hung_rank_ends_the_run_within_the_collective_timeout(tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0 gives up after --collective-timeout with a message
    naming the step and the rank that did not answer (found through the launcher's store), instead of
    waiting the old 300 s; the whole job exits non-zero."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "torch_impl.train", *TINY, "--steps", "400", "--eval-every", "0", "--no-checkpoint",
           "--collective-timeout", "5", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step     3/"):
                break
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ranks = {}
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
            ranks[rank] = int(pid)
        frozen_at = time.monotonic()
        os.kill(ranks[b"1"], signal.SIGSTOP)
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - frozen_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "a collective did not complete within --collective-timeout 5 s" in err and "error: step " in err, err[-3000:]
    assert "rank(s) 1 did not answer (dead, hung, or far behind); rank 0 of 2 reports" in err, err[-3000:]
    # 5 s timeout + up to 5 s finding the silent rank + torchrun's wait (up to 30 s) before it SIGKILLs the
    # stopped rank: ~40 s, with 20 s of margin for a loaded machine; far below the old 300 s
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("bad", [["--collective-timeout", "0"], ["--keep-checkpoints", "-1"],
                                 ["--nonfinite", "ignore"]])
def test_bad_reliability_flags_exit_2(tmp_path, capsys, bad):
    try:
        code = main([*ARGS, "--out-dir", str(tmp_path / "run"), *bad])
    except SystemExit as e:
        code = e.code
    assert code == 2 and not (tmp_path / "run").exists()


def launch(args: list[str], ranks: int | None) -> subprocess.Popen:
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks else [sys.executable])
    return subprocess.Popen([*prefix, "-m", "torch_impl.train", *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_after(proc: subprocess.Popen, signum: int, step_line: str = "step     3/") -> tuple[str, str]:
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith(step_line):
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=120)
    return "".join(out) + rest, err


@pytest.mark.parametrize("ranks,signum", [(2, signal.SIGTERM), (None, signal.SIGINT)])
def test_signal_saves_at_the_step_boundary_and_the_same_command_continues(tmp_path, ranks, signum):
    """SIGTERM to torchrun (forwarded to every rank: preemption) or Ctrl-C to a single process: the
    run stops after the step in flight with a checkpoint on every rank, exits non-zero, and the same
    command line (--resume auto) continues it bit-identically to an uninterrupted run."""
    args = [*TINY, "--steps", "40", "--eval-every", "0", "--total-batch-size", "512", "--resume", "auto"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    check(run([*args, "--out-dir", str(straight)], ranks=ranks))
    proc = launch([*args, "--out-dir", str(stopped)], ranks)
    out, err = signal_after(proc, signum)
    assert proc.returncode != 0, out
    if ranks is None:
        assert proc.returncode == 128 + signum  # the shell's "ended by a signal"
    saved = [s for s, _ in list_checkpoints(stopped)]
    assert len(saved) == 1 and 3 <= saved[0] < 40, (saved, out, err[-2000:])
    assert f"stopped by {signal.Signals(signum).name}" in out and "checkpoint saved" in out, out
    check(run([*args, "--out-dir", str(stopped)], ranks=ranks))
    assert losses(stopped) == losses(straight)  # exact float equality


def test_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path):
    """A bit flipped in the newest checkpoint (same size, so only the checksum can tell): --resume
    says which file is damaged, continues from the previous checkpoint, and still ends exactly
    where the uninterrupted run does. Asked for by path, a truncated checkpoint is an exit-2
    error naming the file; the sampler refuses it too."""
    args = [*TINY, "--steps", "6", "--eval-every", "0"]
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    check(run([*args, "--out-dir", str(straight)]))
    check(run([*args, "--out-dir", str(run_dir), "--stop-at", "4", "--checkpoint-every", "2"]))
    newest = run_dir / "checkpoints" / "step_000004"
    victim = max((f for f in (newest / "model").iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    resumed = check(run([*args, "--out-dir", str(run_dir), "--resume"]))
    assert f"model/{victim.name} is corrupted" in resumed.stdout and "resuming from" in resumed.stdout, resumed.stdout
    assert "step_000002" in resumed.stdout
    assert losses(run_dir) == losses(straight)

    older = run_dir / "checkpoints" / "step_000002" / "optimizer" / "meta.json"
    older.write_bytes(older.read_bytes()[:10])  # truncated
    proc = run([*args, "--out-dir", str(tmp_path / "other"), "--resume", str(older.parent.parent)])
    assert proc.returncode == 2 and "optimizer/meta.json has 10 bytes" in proc.stderr, proc.stderr
    proc = run(["-m", "torch_impl.sample", "--checkpoint", str(older.parent.parent)])
    assert proc.returncode != 0 and "optimizer/meta.json" in proc.stderr


def test_resume_refuses_other_data_of_the_same_length(tmp_path):
    """Same number of tokens, other content (one character changed): the data fingerprint in the
    checkpoint tells them apart."""
    def corpus(name: str, word: str):
        d = tmp_path / name
        d.mkdir()
        for i in range(12):
            (d / f"doc{i}.txt").write_text(f"document {i}: " + " ".join([word] * 400) + "\n")
        return str(d)

    a, b = corpus("a", "alpha"), corpus("b", "alphb")
    args = [*TINY, "--steps", "4", "--eval-every", "0", "--max-corpus-bytes", "1000000"]
    out = tmp_path / "run"
    check(run([*args, "--data", a, "--out-dir", str(out), "--stop-at", "2"]))
    proc = run([*args, "--data", b, "--out-dir", str(out), "--resume"])
    assert proc.returncode == 2, proc.stderr
    assert "trained on other data" in proc.stderr and "train_sha256" in proc.stderr, proc.stderr


def test_second_run_in_the_same_out_dir_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = launch([*TINY, "--steps", "400", "--eval-every", "0", "--no-checkpoint", "--out-dir", str(out)], None)
    try:
        for line in first.stdout:
            if line.startswith("step     1/"):
                break
        second = run([*TINY, "--steps", "400", "--out-dir", str(out), "--resume", "auto"])
        assert second.returncode == 2, second.stderr
        assert "is in use by another run (locked by pid" in second.stderr, second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate()
    check(run([*TINY, "--steps", "2", "--eval-every", "0", "--out-dir", str(out), "--overwrite"]))  # lock released


def test_a_failed_save_is_removed_and_reported(tmp_path, monkeypatch, capsys):
    """A write that fails mid-save (here: ENOSPC on the second checkpoint) ends the run with one line
    naming the checkpoint and the reason; the partial save is gone and the previous checkpoint
    still verifies."""
    import errno

    from torch_impl.training import checkpoint
    calls, rng_state = [0], checkpoint._rng_state

    def full_disk():
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return rng_state()

    monkeypatch.setattr(checkpoint, "_rng_state", full_disk)
    out = tmp_path / "run"
    code = main([*TINY, "--steps", "4", "--eval-every", "0", "--checkpoint-every", "2", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: saving checkpoint step_000004 failed (OSError: [Errno 28] No space left on device)" in err, err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    checkpoint.verify_checkpoint(out / "checkpoints" / "step_000002")


def test_torchrun_restarts_after_a_killed_rank_and_the_run_ends_as_if_uninterrupted(tmp_path):
    """SIGKILL of rank 1 mid-run under `torchrun --max-restarts=2` with `--resume auto`: rank 0 fails
    its collective, torchrun restarts both ranks, they rendezvous again (a store prefix per attempt:
    distributed.restart_store) and resume from the latest checkpoint; the logged losses equal an
    uninterrupted run's exactly."""
    args = [*TINY, "--steps", "60", "--eval-every", "0", "--checkpoint-every", "10", "--total-batch-size", "512",
            "--resume", "auto"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    check(run([*args, "--out-dir", str(straight)], ranks=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           "-m", "torch_impl.train", *args, "--out-dir", str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step    25/"):
                for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                    if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
                break
        rest, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout = "".join(out) + rest
    assert proc.returncode == 0, (stdout[-2000:], err[-3000:])
    assert "resumed from" in stdout and "step_000020" in stdout, stdout[-2000:]
    assert losses(killed) == losses(straight)
