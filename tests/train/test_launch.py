"""How runs are launched: torch_impl.launch (torchrun with one-line failures), usage errors under
torchrun printed once, and a run launched as 2 nodes x 1 process (c10d rendezvous on the loopback
address, the path users take when they outgrow one machine) equal to 1 node x 2 processes."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.train.common import REPO, TINY, check, env, metrics

ARGS = [*TINY, "--steps", "6", "--eval-every", "3", "--total-batch-size", "512"]


def launch(launcher_args: list[str], train_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch_impl.launch", *launcher_args, "-m", "torch_impl.train",
                           *train_args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def test_launcher_checks_the_training_flags_before_starting_any_rank(tmp_path):
    out = tmp_path / "run"
    proc = launch(["--standalone", "--nproc_per_node=2"], [*ARGS, "--matrix-lr", "-1", "--out-dir", str(out)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: --matrix-lr must be a finite number >= 0, got -1.0\n"
    proc = launch(["--standalone", "--nproc_per_node=2"], [*ARGS, "--bogus", "--out-dir", str(out)])
    assert proc.returncode == 2
    assert proc.stderr == "python -m torch_impl.train: error: unrecognized arguments: --bogus (see --help)\n"
    assert not out.exists()


def test_launcher_turns_a_failed_rank_into_one_line_and_its_exit_code(tmp_path):
    """A usage error only the workers can find (the corpus path): the worker's line once, then the
    launcher's one line, no launcher traceback, and the worker's exit code 2 (torchrun exits 1)."""
    proc = launch(["--standalone", "--nproc_per_node=2"], [*ARGS, "--data", str(tmp_path / "missing"),
                                                           "--out-dir", str(tmp_path / "run")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: corpus: {tmp_path / 'missing'}: no such file or directory", proc.stderr
    assert len(lines) == 2 and lines[1].startswith("error: torch_impl.train: rank ") and "exited with code 2" in \
        lines[1], proc.stderr


def test_usage_error_under_plain_torchrun_is_printed_by_rank_0_only(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "torch_impl.train"]
    for bad, message in [(["--matrix-lr", "-1"], "error: --matrix-lr must be"),
                         (["--bogus"], "error: unrecognized arguments: --bogus")]:
        proc = subprocess.run([*cmd, *ARGS, *bad, "--out-dir", str(tmp_path / "run")], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count(message) == 1, proc.stderr  # not once per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    check(launch(["--standalone", "--nproc_per_node=2"], [*ARGS, "--out-dir", str(one_node)]))
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch_impl.launch", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
                               "-m", "torch_impl.train", *ARGS, "--out-dir", str(two_nodes)],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [(n.wait(timeout=300), *n.communicate()) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for code, out, err in results:
        assert code == 0, (out[-2000:], err[-3000:])
    assert sum("2 rank(s) on cpu" in out for _, out, _ in results) == 1  # one rank 0, which logs
    assert records(two_nodes) and records(two_nodes) == records(one_node)  # exact float equality


def records(out_dir) -> list[tuple]:
    return [(r["type"], r["step"], r.get("loss"), r.get("val_bpb")) for r in metrics(out_dir)
            if r["type"] in ("train", "val")]
