"""
Training checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory `<out_dir>/checkpoints/step_NNNNNN/`:

    model/               model state dict, torch.distributed.checkpoint (DCP) format, under the
                         unwrapped model's names (get_model_state_dict: checkpoint and compile
                         wrappers removed); FSDP2 runs write their row shards, and any run loads
                         any other's (DCP reads the overlapping chunks)
    optimizer/           optimizer state, DCP via torch_impl.sharding.optimizer_checkpoint (sharded DistMuon /
                         DistAdamW state is resharded on load, so N ranks can resume on M)
    rng/rank{r}.pt       each rank's torch / CUDA / Python / NumPy RNG states
    tokenizer_meta.json  (+ tokenizer.json for BPE) which tokenizer the ids belong to
    meta.json            step, data loader position, model config, the run's arguments, the data
                         fingerprint (token-stream hashes, checked on resume) and the manifest:
                         size and CRC32 of every other file (verify_checkpoint)

Every rank writes into `.tmp-step_NNNNNN/`; once all are done, rank 0 writes meta.json and renames
the directory into place. A rename is atomic on POSIX, so a crash mid-save leaves only a dot-dir that
is never mistaken for a checkpoint (and is cleaned up by the next save): a directory named step_* is
always complete. A write that fails on any rank (a full disk) fails the save on every rank and removes
the partial save. A damaged checkpoint (a file truncated, missing or changed since) is found by its
manifest; `--resume` then falls back to the previous sound one. `keep` deletes all but the newest
checkpoints once a new one is complete. Multi-node runs need out_dir on a shared filesystem.

The model is saved in full precision with DCP, so loading it back is bit-exact; together with the
loader position, the optimizer state and the pure schedules, a resumed run reproduces the loss
trajectory of an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from torch_impl.data.tokenizer import load_tokenizer, save_tokenizer
from torch_impl.models.gpt import GPT, GPTConfig
from torch_impl.sharding.comm import any_rank, barrier, is_initialized, world
from torch_impl.sharding.optimizer_checkpoint import load_optimizer, save_optimizer

FORMAT_VERSION = 1
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit the current run."""


@contextlib.contextmanager
def _quiet_no_dist():
    # without a process group DCP warns on every call that it "assumes the intent" of a single process,
    # which is exactly our intent (sample, export, single-process training)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# -----------------------------------------------------------------------------
# finding checkpoints

def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a run, oldest first."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / META_FILE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run's out_dir (meaning its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / META_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint (no {META_FILE}) nor a run directory with checkpoints")
    return latest


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def manifest(ckpt: Path) -> dict[str, list]:
    """{relative path: [size, crc32]} of every file of a checkpoint directory (meta.json aside):
    written into meta.json at save, checked by verify_checkpoint at load. CRC32 finds torn,
    truncated and bit-flipped files at disk speed (it is not a defence against tampering)."""
    return {str(f.relative_to(ckpt)): [f.stat().st_size, _crc32(f)]
            for f in sorted(ckpt.rglob("*")) if f.is_file() and f != ckpt / META_FILE}


def verify_checkpoint(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's meta.json after checking every file against its manifest; CheckpointError
    naming the first missing, truncated or corrupted file. (Checkpoints written before manifests
    existed are accepted unchecked.)"""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    for rel, (size, crc) in meta.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt}: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: {rel} has {f.stat().st_size} bytes, {size} were written (truncated?)")
        if _crc32(f) != crc:
            raise CheckpointError(f"{ckpt}: {rel} is corrupted (checksum {_crc32(f)}, written {crc})")
    return meta


def read_meta(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    return meta


def model_config(meta: dict) -> GPTConfig:
    return GPTConfig(**meta["model_config"])


# -----------------------------------------------------------------------------
# RNG states (per rank: every rank has its own generators)

def _rng_state() -> dict:
    # numpy's state holds an ndarray and python's a tuple of ints: converted to tensors/lists so the
    # file loads with torch.load(weights_only=True)
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# saving

def _agree_saved(failure: BaseException | None, tmp: Path, final: Path, rank: int) -> None:
    """Collective: if the save failed on any rank, remove the partial save and raise CheckpointError on
    every rank (with this rank's reason, or a pointer to the rank that failed)."""
    (failed,) = any_rank([failure is not None])
    if not failed:
        return
    barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    reason = (f"{type(failure).__name__}: {str(failure).strip().splitlines()[0] if str(failure).strip() else ''}"
              if failure is not None else "it failed on another rank")
    raise CheckpointError(f"saving checkpoint {final.name} failed ({reason}); the partial save was removed and the "
                          "previous checkpoint is intact")


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: GPT, optimizer, tokenizer,
                    loader_state: dict, extra_meta: dict, rank: int = 0, keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. `keep` > 0: once this
    one is complete, delete all but the newest `keep` checkpoints of the run."""
    root = checkpoints_dir(out_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        # leftovers of a save that crashed half-way are garbage by construction
        for stale in root.glob(".tmp-*") if root.is_dir() else ():
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier()
    # A write that fails (a full disk, a vanished file system) on any rank fails the save on every rank,
    # agreed before anything is renamed: the partial save is removed and the previous checkpoint stays.
    failure = None
    try:
        with _quiet_no_dist():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp / "model", no_dist=not is_initialized())
        save_optimizer(optimizer, tmp / "optimizer")
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    except Exception as e:  # noqa: BLE001 - OSError, or DCP's wrapper of one rank's OSError
        failure = e
    _agree_saved(failure, tmp, final, rank)
    if rank == 0:
        try:
            save_tokenizer(tokenizer, tmp)
            meta = dict(format=FORMAT_VERSION, step=step, loader=loader_state, model_config=asdict(model.config),
                        world_size=world()[1], **extra_meta,
                        files=manifest(tmp))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        except OSError as e:
            failure = e
    _agree_saved(failure, tmp, final, rank)
    if rank == 0:
        if final.exists():
            # re-saving a step (a resume from an older checkpoint got here again): replace it, keeping
            # the window in which no complete step dir exists as short as two renames
            old = root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if keep > 0:
            for _, old_ckpt in list_checkpoints(out_dir)[:-keep]:
                # renamed first, so an interrupted delete never leaves a half checkpoint named step_*
                trash = old_ckpt.with_name(f".tmp-old-{old_ckpt.name}")
                old_ckpt.rename(trash)
                shutil.rmtree(trash)
    barrier()
    return final


# -----------------------------------------------------------------------------
# loading

def load_model_state(ckpt: str | os.PathLike, model: GPT) -> None:
    """Load the weights in place: each rank reads what it holds (the whole model, or its FSDP2 rows),
    whatever the sharding and world size at save time."""
    state = {"model": get_model_state_dict(model)}
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=Path(ckpt) / "model", no_dist=not is_initialized())
    set_model_state_dict(model, state["model"])


def load_training_state(ckpt: str | os.PathLike, model: GPT, optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and this rank's RNG states; returns the checkpoint's meta.json."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    load_model_state(ckpt, model)
    load_optimizer(optimizer, ckpt / "optimizer")
    rng_file = ckpt / "rng" / f"rank{rank}.pt"
    # a resume on more ranks than were saved has no state for the new ones; their generators keep the
    # seed they got (training itself draws no random numbers, so the trajectory does not depend on them)
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, object, dict]:
    """(model in eval mode, tokenizer, meta) from a checkpoint or a run directory (its latest checkpoint).
    For inference and export: no optimizer, no process group needed."""
    ckpt = resolve_checkpoint(path)
    meta = verify_checkpoint(ckpt)
    with torch.device("meta"):
        model = GPT(model_config(meta))
    model.to_empty(device=device)
    model.init_weights()  # recomputes the rotary buffers, which are not in the state dict
    load_model_state(ckpt, model)
    return model.eval(), load_tokenizer(ckpt), meta
