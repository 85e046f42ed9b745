"""The checks that make an optimizer's failures collective: each rank learns what went wrong on
any rank and raises the same error, instead of some ranks hanging in the next collective.

- `check_same_on_all_ranks`: a small all_gather at construction that makes every rank raise
  together when the parameter lists differ (or one rank failed locally).
- `grad_flags`: one `any_rank` per step over per-parameter "gradient non-finite", "gradient
  present" and "gradient absent" flags, so every rank raises or skips together.
- `named_params`, `param_signature`: how parameters are named in messages and compared.
"""

from __future__ import annotations

import hashlib

import torch

from torch_impl.sharding.comm import Comm, all_gather_ints


def named_params(group: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, param) pairs of an optimizer group; unnamed params are named by position."""
    names = group.get("param_names") or [
        f"param[{i}] {tuple(p.shape)}" for i, p in enumerate(group["params"])]
    return list(zip(names, group["params"]))


def param_signature(param_groups: list[dict]) -> str:
    """Names, shapes and dtypes of every parameter, group by group: what must agree across
    ranks for the collectives of a step to line up."""
    lines = []
    for gi, group in enumerate(param_groups):
        for name, p in named_params(group):
            lines.append(f"{gi} {name} {tuple(p.shape)} {p.dtype} {p.device.type}")
    return "\n".join(lines)


def local_device_error(param_groups: list[dict]) -> str | None:
    devices = {p.device for g in param_groups for p in g["params"]}
    if len(devices) > 1:
        return f"all parameters must be on one device, found {sorted(map(str, devices))}"
    return None


def check_same_on_all_ranks(comm: Comm, signature: str, local_error: str | None, what: str) -> None:
    """All-gather a hash of `signature` plus a local-error flag and raise on every rank if
    any rank failed or the hashes differ. A no-op at world size 1."""
    if comm.world_size == 1:
        if local_error:
            raise ValueError(local_error)
        return
    digest = int.from_bytes(hashlib.sha256(signature.encode()).digest()[:7], "little")
    every = all_gather_ints([digest, int(local_error is not None)], comm.group)
    failed = [r for r, (_, err) in enumerate(every) if err]
    if failed:
        raise ValueError(f"{what} failed on rank(s) {failed}: "
                         f"{local_error or 'see the error raised on those ranks'}")
    if len({h for h, _ in every}) > 1:
        classes = {}
        for r, (h, _) in enumerate(every):
            classes.setdefault(h, []).append(r)
        raise ValueError(f"{what}: parameter lists differ across ranks (rank groups with equal "
                         f"lists: {sorted(classes.values())}); every rank must pass the same "
                         f"parameters in the same order. This rank (rank {comm.rank}) has:\n"
                         + signature[:2000])


def grad_flags(comm: Comm, param_groups: list[dict], check_finite: bool,
               reduced: dict[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """One any_rank over per-parameter flags [non-finite, present, absent].

    Raises on every rank if some parameter has a gradient on some ranks but not on others
    (the sharded collectives would otherwise be built from different stacks and hang).
    Returns the names whose gradient is non-finite on any rank (empty if not checked).
    `reduced`: parameters whose gradient was already sent off and dropped in backward
    (sharding/backward_reduce.py): present, with their recorded non-finite flag."""
    reduced = reduced or {}
    named = [(n, p) for g in param_groups for n, p in named_params(g)]
    if not named:
        return []
    dev = comm.device
    grads = [p.grad for _, p in named]
    has = [g is not None or p in reduced for g, (_, p) in zip(grads, named)]
    present = torch.tensor(has, dtype=torch.int32, device=dev)
    bad = torch.zeros(len(grads), dtype=torch.int32, device=dev)
    if check_finite and any(has):
        # a DTensor gradient (FSDP2) is checked on this rank's shard; any_rank's max is global
        flags = [reduced[p] if p in reduced else ~torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all()
                 for g, (_, p) in zip(grads, named) if g is not None or p in reduced]
        bad[present.bool()] = torch.stack(flags).to(device=dev, dtype=torch.int32)
    flags = comm.any_rank(torch.cat([bad, present, 1 - present]))
    bad, any_present, any_absent = (flags[i * len(named):(i + 1) * len(named)] for i in range(3))
    uneven = [n for (n, _), a, b in zip(named, any_present, any_absent) if a and b]
    if uneven:
        raise ValueError(f"gradient present on some ranks but not on others: {', '.join(uneven)}; "
                         "every rank must produce the same set of gradients (zero-fill unused ones)")
    return [n for (n, _), b in zip(named, bad) if b]
