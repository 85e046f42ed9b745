"""`python -m torch_impl.train`: parse the flags, join the job, plan and run it, and turn every way a
run can end into one line and an exit code (0 done, 1 a runtime failure, 2 a usage error, 128 + N
stopped by signal N with a checkpoint)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from datetime import timedelta

import torch.distributed as dist

from torch_impl.optim.nonfinite import NonFiniteGradientError
from torch_impl.sharding.comm import barrier
from torch_impl.training.checkpoint import CheckpointError
from torch_impl.training.config import TrainConfig, UsageError
from torch_impl.training.health import TrainingDiverged
from torch_impl.training.loop import train
from torch_impl.training.out_dir import release_locks
from torch_impl.training.plan import RunComplete, plan_run
from torch_impl.training.preemption import Stopped, StopSignals
from torch_impl.training.runtime import CollectiveFailure, init_from_env


def main(argv=None) -> int:
    # torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor and warns on every call site, on
    # every rank; the old names are what gloo and NCCL both support, so keep the log readable
    warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
    # under torchrun every rank parses the same flags and meets the same usage errors: rank 0 alone
    # prints them (and --help); RANK is what Dist.master reads too, and it is known before the group
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext(), \
            contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        cfg = TrainConfig.from_argv(argv)
    d = None
    try:
        d = init_from_env(cfg.device_type(), timeout=timedelta(seconds=cfg.collective_timeout))
        with StopSignals() as stop:
            train(plan_run(cfg, d), d, stop)
        # every rank reaches the teardown together: a rank that exits while a peer is still
        # tearing down its gloo pairs can make the peer abort (seen ~1 in 16 runs under load)
        barrier()
        return 0
    except RunComplete as e:
        if d.master:
            print(e, flush=True)
        return 0
    except (UsageError, NonFiniteGradientError, TrainingDiverged) as e:
        if not quiet:  # one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except CheckpointError as e:  # a failed save (e.g. a full disk): every rank raises it, rank 0 says it
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # a signal: the checkpoint is saved; 128 + signum, the shell's "ended by a signal"
        return 128 + e.signum
    except CollectiveFailure as e:  # every surviving rank says it: rank 0 may be the one that died
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        release_locks()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
