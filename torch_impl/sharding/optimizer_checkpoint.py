"""Optimizer-state checkpoints that survive a change of world size.

API (collective: every rank calls it; also works without a process group):

    save_optimizer(opt, path)      write opt's state into directory `path`, atomically
    load_optimizer(opt, path)      restore it at any world size; each rank reads only
                                   the entries it owns at the current world size
    consolidated_state(opt)        {key: full tensor} on rank 0 ({} on the others)

`opt` is a HybridOptimizer (torch_impl.optim.hybrid) or a single Muon / AdamW / DistMuon /
DistAdamW. Model parameters are not included: checkpoint them separately. The code never
asks what class an optimizer is: it asks each part where a parameter's state lives
(`placement(p)`, torch_impl/sharding/placement.py) at the part's world size.

Format: a torch.distributed.checkpoint (DCP) directory
(https://pytorch.org/docs/stable/distributed.checkpoint.html) holding the *logical*,
unsharded state, one entry per (optimizer part, group, parameter, state key):

    "<part>.<group index>.<parameter name>.<state key>"
    e.g. "muon.0.transformer.h.3.mlp.c_fc.weight.momentum_buffer", "adamw.1.lm_head.weight.exp_avg"

(names come from the group's `param_names`, as `hybrid()` sets them), plus `meta.json`:
world size at save time, per group the parameter names and shapes (checked on load) and
the scheduled hyperparameters (lr, initial_lr, momentum, weight_decay: restored on load).
Each rank writes what it holds: an Owned parameter's owner writes its whole state; Rows
shards are written as DTensor shards (Shard(0), the same uneven split as the optimizer
uses), so DCP records every rank's chunk; Replicated state (single-process optimizers,
AdamW's small parameters, AdamW step counts) is written by rank 0 only. On load every rank asks
DCP for the entries (or the rows of them) that it owns at the *new* world size, and DCP
reads the overlapping chunks: that is the resharding N → M.

Atomicity: everything is written into `<path>.tmp` beside `path`, then rank 0 renames it to
`path` (moving an existing `path` aside to `<path>.old` first and deleting it afterwards),
so `path` is always either absent, the previous complete checkpoint, or the new complete
one. `meta.json` is written last; `load_optimizer` refuses a directory without it.
Failures on one rank are agreed on with a small all_reduce, so every rank raises.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torch_impl.sharding.checks import named_params
from torch_impl.sharding.comm import all_gather_object, any_rank, collective_device, is_initialized, recv, send, world
from torch_impl.sharding.placement import Owned, RowSplit

FORMAT_VERSION = 1
META_FILE = "meta.json"
SCHEDULED = ("lr", "initial_lr", "momentum", "weight_decay")


# -- where each parameter's state lives --------------------------------------------------

def _parts(opt) -> dict[str, torch.optim.Optimizer]:
    """{part name: optimizer}: a HybridOptimizer's parts, or a single optimizer by its kind."""
    parts = getattr(opt, "optimizers", None)
    if parts is not None:
        return dict(parts)
    if getattr(opt, "kind", None) is None or not hasattr(opt, "placement"):
        raise TypeError(f"expected a HybridOptimizer, Muon or AdamW (torch_impl.optim), got {type(opt).__name__}")
    return {opt.kind: opt}


def _group(opt):
    """The process group the checkpoint is collective over: that of the sharded parts, else
    the default group (a single-process optimizer in a multi-rank job is replicated)."""
    for o in _parts(opt).values():
        if not o.comm.is_local:
            return o.comm.group
    return None


def _row_sliced(shape, p: torch.Tensor) -> bool:
    """State shaped like the parameter is split by rows; anything else (step counts) is not."""
    return p.ndim >= 1 and tuple(shape) == tuple(p.shape)


def _named(optim):
    for gi, group in enumerate(optim.param_groups):
        for name, p in named_params(group):
            yield gi, name, p


def _local_pieces(opt):
    """(key, tensor, full shape, row offset or None) for every entry this rank writes."""
    rank, n = world(_group(opt))
    pieces = []
    for part, optim in _parts(opt).items():
        for gi, name, p in _named(optim):
            if p not in optim.state:
                continue
            where = optim.placement(p)
            for k, v in optim.state[p].items():
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"optimizer state {part}.{gi}.{name}.{k} is a "
                                    f"{type(v).__name__}; only tensors are checkpointed")
                key = f"{part}.{gi}.{name}.{k}"
                if isinstance(where, RowSplit) and v.ndim == p.ndim and v.shape[1:] == p.shape[1:]:
                    start, _ = where.local_rows(rank)
                    pieces.append((key, v, tuple(p.shape), start))  # rows [start, end) of the whole
                elif isinstance(where, Owned) or rank == 0:
                    pieces.append((key, v, tuple(v.shape), None))
    return pieces


def _mesh(opt, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(_group(opt) or dist.group.WORLD, device_type)


def _as_shard(local: torch.Tensor, full_shape, mesh):
    from torch.distributed.tensor import DTensor, Shard
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                              shape=torch.Size(full_shape), stride=stride)


@contextmanager
def _quiet_without_group():
    """DCP warns that it 'assumes' single-process mode even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        if not is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _agree(ok: bool, group) -> bool:
    """True on every rank iff `ok` on every rank."""
    return not any_rank([not ok], group)[0]


# -- save / load --------------------------------------------------------------------------

def _meta(opt, n: int) -> dict:
    parts = {}
    for part, optim in _parts(opt).items():
        groups = []
        for group in optim.param_groups:
            named = named_params(group)
            groups.append(dict(names=[nm for nm, _ in named], shapes=[list(p.shape) for _, p in named],
                               hyper={k: group[k] for k in SCHEDULED if k in group}))
        parts[part] = dict(cls=type(optim).__name__, groups=groups)
    return dict(format=FORMAT_VERSION, world_size=n, parts=parts)


def save_optimizer(opt, path) -> None:
    """Write `opt`'s state to directory `path` (collective, atomic; see the module doc)."""
    group = _group(opt)
    rank, n = world(group)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if not _agree(error is None, group):
        raise OSError(f"could not create {tmp}: {error or 'failed on rank 0'}")

    pieces = _local_pieces(opt)
    state = {}
    meshes = {}
    for key, t, full, offset in pieces:
        if offset is None:
            state[key] = t
        else:
            mesh = meshes.get(t.device.type) or meshes.setdefault(t.device.type, _mesh(opt, t.device.type))
            state[key] = _as_shard(t, full, mesh)
    with _quiet_without_group():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=group,
                 no_dist=not is_initialized())

    if rank == 0:
        try:
            (tmp / META_FILE).write_text(json.dumps(_meta(opt, n), indent=1))
            old = path.with_name(path.name + ".old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = e
    if not _agree(error is None, group):
        raise OSError(f"could not finish optimizer checkpoint {path}: {error or 'failed on rank 0'}")


def read_meta(path) -> dict:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete optimizer checkpoint (no {META_FILE})")
    return json.loads(meta_file.read_text())


def _check_meta(opt, meta: dict) -> None:
    parts = _parts(opt)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"optimizer checkpoint format {meta.get('format')}, expected {FORMAT_VERSION}")
    if set(meta["parts"]) != set(parts):
        raise ValueError(f"checkpoint has optimizer parts {sorted(meta['parts'])}, expected {sorted(parts)}")
    for part, optim in parts.items():
        saved = meta["parts"][part]["groups"]
        if len(saved) != len(optim.param_groups):
            raise ValueError(f"{part}: checkpoint has {len(saved)} groups, optimizer {len(optim.param_groups)}")
        for gi, (s, group) in enumerate(zip(saved, optim.param_groups)):
            named = named_params(group)
            mine = ([nm for nm, _ in named], [list(p.shape) for _, p in named])
            if (s["names"], s["shapes"]) != mine:
                raise ValueError(f"{part} group {gi}: parameters differ from the checkpoint's "
                                 f"(saved {list(zip(s['names'], s['shapes']))}, "
                                 f"now {list(zip(*mine))})")


def load_optimizer(opt, path) -> None:
    """Restore `opt`'s state from `path` at the current world size (collective)."""
    meta = read_meta(path)
    _check_meta(opt, meta)
    group = _group(opt)
    rank, n = world(group)
    reader = dcp.FileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata

    request, install, meshes = {}, [], {}
    for part, optim in _parts(opt).items():
        for gi, name, p in _named(optim):
            prefix = f"{part}.{gi}.{name}."
            keys = [k for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]]
            where = optim.placement(p)
            rows = where.local_rows(rank)
            for key in keys:
                md = saved[key]
                dtype = md.properties.dtype
                if rows is not None and rows[1] == rows[0]:
                    continue  # owns no rows of this parameter: no state at all
                if rows is not None and _row_sliced(md.size, p):
                    a, b = rows
                    local = torch.empty((b - a, *md.size[1:]), dtype=dtype, device=p.device)
                    mesh = meshes.get(p.device.type) or meshes.setdefault(p.device.type, _mesh(opt, p.device.type))
                    request[key] = _as_shard(local, tuple(md.size), mesh)
                elif not where.holds(rank):
                    continue  # another rank owns it
                else:
                    local = torch.empty(tuple(md.size), dtype=dtype, device=p.device)
                    request[key] = local
                install.append((optim, p, key[len(prefix):], key))
    with _quiet_without_group():
        dcp.load(request, storage_reader=reader, process_group=group, no_dist=not is_initialized())

    for optim in _parts(opt).values():
        for p in [p for g in optim.param_groups for p in g["params"]]:
            optim.state.pop(p, None)
    for optim, p, state_key, key in install:
        t = request[key]
        optim.state[p][state_key] = t.to_local() if hasattr(t, "to_local") else t
    for part, optim in _parts(opt).items():
        for s, group in zip(meta["parts"][part]["groups"], optim.param_groups):
            for k, v in s["hyper"].items():
                if k in group:
                    group[k] = v


def consolidated_state(opt) -> dict[str, torch.Tensor]:
    """The full (unsharded) state, keyed like the checkpoint entries, on rank 0; {} on the
    other ranks. Collective: pieces travel to rank 0 by point-to-point send/recv, through the
    collective's device, and land on the device of the optimizer's parameters."""
    group = _group(opt)
    rank, n = world(group)
    pieces = _local_pieces(opt)
    if n == 1:
        return {key: t.clone() for key, t, _, _ in pieces}
    described = [(key, full, offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                 for key, t, full, offset in pieces]
    every = all_gather_object(described, group)
    if rank != 0:
        for _key, t, _, _ in pieces:
            if t.numel():
                send(t, 0, group)
        return {}
    out: dict[str, torch.Tensor] = {}
    local = {key: t for key, t, _, _ in pieces}
    params = [p for o in _parts(opt).values() for g in o.param_groups for p in g["params"]]
    device = (params[0].to_local() if hasattr(params[0], "to_local") else params[0]).device if params else \
        collective_device(group)
    for src, entries in enumerate(every):
        for key, full, offset, shape, dtype in entries:
            dtype = getattr(torch, dtype)
            if src == 0:
                t = local[key]
            elif math.prod(shape):
                t = recv(shape, dtype, src, group, device=device)
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
            if offset is None:
                out[key] = t.clone()
            else:
                buf = out.setdefault(key, torch.zeros(full, dtype=dtype, device=device))
                buf[offset:offset + shape[0]].copy_(t)
    return out
