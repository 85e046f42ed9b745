"""Stop a run at the next step boundary, with a checkpoint, when it is told to (SIGTERM from a
scheduler that preempts the job, SIGINT from Ctrl-C).

    with StopSignals() as stop:
        while training:
            step()
            signalled, due = stop.agreed(checkpoint_due=False)  # any rank signalled → every rank stops
                save_checkpoint(...); break

The first signal only sets a flag: the step in flight finishes, every rank learns of it at the
same step boundary (ranks may receive the signal at different moments, or only some of them),
saves, and exits with 128 + the signal's number, the shell's convention for "ended by a signal",
so a job script can tell an interrupted run from a finished one; rerunning the same command with
`--resume auto` continues. A second signal exits at once, the default behaviour.
"""

from __future__ import annotations

import signal
import sys

from torch_impl.sharding.comm import any_rank

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: stop now, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, checkpoint_due: bool, group=None) -> tuple[int | None, bool]:
        """(the signal number if any rank of `group` received one, else None; whether any rank
        found a time-based checkpoint due). Every rank gets the same answer: one any_rank of two
        integers (ranks' clocks and signals need not agree)."""
        signum, due = any_rank([self.received or 0, int(checkpoint_due)], group)
        return signum or None, bool(due)


class Stopped(Exception):
    """The run stopped at a step boundary because of a signal (after its checkpoint)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
