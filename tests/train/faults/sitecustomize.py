"""Fault injection for the chaos test (tests/train/test_chaos.py), loaded by every Python process
whose PYTHONPATH starts with this folder: with FAULT_KILL_SAVE=step_NNNNNN set, rank 0 (the rank that
writes meta.json) kills itself with SIGKILL when it is about to write that checkpoint's meta.json, in
the first attempt of a torchrun run only. The model, optimizer and RNG files are on disk by then, in the
checkpoint's temporary directory: the kill lands in the middle of a checkpoint write."""

import os
import pathlib
import signal

_target = os.environ.get("FAULT_KILL_SAVE")
if _target and os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    _write_text = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "meta.json" and self.parent.name == f".tmp-{_target}":
            os.kill(os.getpid(), signal.SIGKILL)
        return _write_text(self, *args, **kwargs)

    pathlib.Path.write_text = write_text
