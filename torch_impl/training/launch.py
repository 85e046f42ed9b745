"""
torchrun with a one-line failure: `python -m torch_impl.launch` takes exactly torchrun's arguments.

    python -m torch_impl.launch --standalone --nproc_per_node=2 -m torch_impl.train --depth 4

torchrun answers any failed worker with ~25 lines of its own traceback and a failure table around the
one line the worker printed, and always exits 1. This launcher runs the same elastic agent
(torch.distributed.run.run: rendezvous, --max-restarts, signal forwarding are torchrun's), but:

- the training flags of `-m torch_impl.train` are checked here, before any worker starts: a bad flag
  costs no rendezvous and prints its one line once (TrainConfig.validate, the same check the workers
  run);
- a failed worker group ends with one line naming the first rank that failed and its exit code,
  after the workers' own messages, and the launcher exits with that worker's code (2 for a usage
  error, 1 for a runtime failure, 128+N for signal N);
- the agent's per-process log lines ("Sending process ... closing signal", "failed (exitcode ...)")
  are silenced; its restart and rendezvous messages are kept.
"""

from __future__ import annotations

import logging
import socket
import sys

TRAIN_MODULE = "torch_impl.train"


def _train_args(args) -> list[str] | None:
    """The training flags when the launched program is `-m torch_impl.train`, else None."""
    if getattr(args, "module", False) and args.training_script == TRAIN_MODULE:
        return list(args.training_script_args)
    return None


def precheck(train_argv: list[str]) -> int | None:
    """Parse and validate the training flags in this process; an exit code if they cannot run."""
    from torch_impl.training.config import TrainConfig, UsageError
    try:
        cfg = TrainConfig.from_argv(train_argv)  # argparse prints its own error and exits 2
        cfg.validate()  # includes --device
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or an argparse error
        return e.code if isinstance(e.code, int) else 2
    return None


def failure_line(err) -> tuple[str, int]:
    """One line for a ChildFailedError and the exit code to leave with: the first failed rank's."""
    rank, first = err.get_first_failure()
    if first.exitcode < 0:
        how, code = f"was killed by {first.signal_name()}", 128 - first.exitcode
    else:
        how, code = f"exited with code {first.exitcode}", first.exitcode or 1
    others = sorted(r for r in err.failures if r != rank)
    tail = f" (rank(s) {', '.join(map(str, others))} stopped with it)" if others else ""
    return f"error: {err.name}: rank {rank} on {socket.gethostname()} {how}{tail}; see its message above", code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    train_argv = _train_args(args)
    if train_argv is not None:
        code = precheck(train_argv)
        if code is not None:
            return code
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        line, code = failure_line(e)
        print(line, file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
