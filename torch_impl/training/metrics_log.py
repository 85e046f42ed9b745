"""A run's record: rank 0 prints one line per event and appends it as JSON to metrics.jsonl
(torch_impl.plot draws it); on resume the records past the checkpoint are dropped, so the file
tells one timeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch_impl.training.plan import METRICS_FILE
from torch_impl.training.runtime import Dist


class MetricsLog:
    """Rank 0 prints one line per event and appends it as JSON to metrics.jsonl; other ranks stay quiet.
    With a terminal, a tqdm bar shows progress and ETA, and lines are printed above it."""

    def __init__(self, out_dir: Path, d: Dist, total: int, initial: int, resume_step: int | None):
        self.master = d.master
        self.path = out_dir / METRICS_FILE
        self.bar = None
        if not self.master:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            # drop records past the checkpoint: the steps after it are about to be redone; a line that
            # does not parse is the torn last write of a killed run: dropped (repaired), and said so
            kept, torn = [], 0
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        record = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        torn += 1
                        continue
                    if record is not None and record.get("step", 0) <= resume_step:
                        kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))
            if torn:
                self.print(f"{self.path}: dropped {torn} unreadable line(s) (a write cut short by a crash)")
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                            file=sys.stdout)

    def print(self, text: str) -> None:
        if not self.master:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, text: str, **fields) -> None:
        if not self.master:
            return
        self.print(text)
        with self.path.open("a") as f:
            f.write(json.dumps(fields) + "\n")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
