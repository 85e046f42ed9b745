"""Muon: the math of one step on a stack of same-shape matrices, and the optimizer around it.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) with nanochat's
conventions. For a stack of K matrices P (rows × cols) with gradients G, momentum μ:

    M  ← lerp(M, G, 1 − μ)                 EMA momentum buffer
    U  = lerp(G, M, μ)  (Nesterov)  or  M
    O  = orth(U)                           Newton-Schulz / Polar Express ≈ polar factor
    [NorMuon, β₂ set (https://arxiv.org/abs/2510.05491): per-row (or per-column, along
     the larger side) second moment v ← lerp(v, mean(O², smaller side), 1 − β₂),
     O ← O/√v rescaled to keep ‖O‖_F]
    P  ← P·(1 − lr·wd·mask) − lr·scale·O   mask = 1, or (O·P ≥ 0) for cautious decay

with scale = max(1, rows/cols)^½ ("max_ratio", nanochat) or 0.2·√max(rows, cols)
("match_rms_adamw", Moonlight https://arxiv.org/abs/2502.16982). Weight decay is
decoupled and not shape-scaled, as in torch.optim.Muon.

`muon_step` is the only place this math lives (.specs/muon_math.md states it once for
both frameworks), in two halves: `muon_direction` (everything up to O, on whole matrices)
and `apply_direction` (the last line, elementwise). The optimizer `Muon` below calls
`muon_step` on the matrices of each same-shape stack that its rank holds; on FSDP2 parameters
the owner runs `muon_direction` and every rank `apply_direction` on its rows
(sharding/row_owners.py moves the rows). The orthogonalizers are named in
orthogonalizers/registry.py; MuonEq / Muon+ wrap them (orthogonalizers/balance.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from torch_impl.optim.base import ShardedOptimizer, default_group
from torch_impl.orthogonalizers.balance import balanced
from torch_impl.orthogonalizers.newton_schulz import frobenius_norm
from torch_impl.orthogonalizers.registry import check_orthogonalizer, resolve_orthogonalizer
from torch_impl.sharding.backward_reduce import Bucket, stack_bucket
from torch_impl.sharding.checks import named_params
from torch_impl.sharding.placement import Placement, StackLayout, muon_layouts, owner_loads, same_shape_stacks
from torch_impl.sharding.row_owners import RowsToOwners

SHAPE_SCALES = ("max_ratio", "match_rms_adamw")


def shape_scale(rows: int, cols: int, rule: str) -> float:
    """Update multiplier that makes the orthogonalized update's size shape-aware."""
    if rule == "max_ratio":
        # planted-bug target (parity_tests/mutants.py)
        return max(1.0, rows / cols) ** 0.5
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown shape_scale {rule!r}; valid: {', '.join(SHAPE_SCALES)}")


def as_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """N-D parameters (conv kernels, ...) are orthogonalized as (shape[0], prod(rest))."""
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters with ≥ 2 dims, got shape {tuple(shape)}; "
                         "send 0-D/1-D parameters to AdamW")
    return shape[0], math.prod(shape[1:])


def normuon_state_shape(rows: int, cols: int) -> tuple[int, int]:
    """NorMuon keeps one second moment per row of the larger side: reduce the smaller one."""
    return (rows, 1) if rows >= cols else (1, cols)


@dataclass(frozen=True)
class MuonHyper:
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    cautious_weight_decay: bool
    normuon_beta2: float | None
    shape_scale: str
    orthogonalize: Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def muon_direction(
    grads: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor | None,
    hp: MuonHyper,
) -> torch.Tensor:
    """O of one step on fp32 (K, rows, cols) stacks of whole matrices: momentum, Nesterov,
    orthogonalization and NorMuon. `momentum_buf` and `second_moment` are updated in place,
    `grads` is read only. Needs whole matrices (the orthogonalizer and NorMuon's norms are
    not row-local); the FSDP2 optimizer runs it on the owner of each matrix."""
    rows, cols = grads.shape[-2:]
    momentum_buf.lerp_(grads, 1 - hp.momentum)
    # planted-bug target (parity_tests/mutants.py)
    update = grads.lerp(momentum_buf, hp.momentum) if hp.nesterov else momentum_buf
    O = hp.orthogonalize(update).to(grads.dtype)
    if hp.normuon_beta2 is not None:
        reduce_dim = -1 if rows >= cols else -2
        second_moment.lerp_(O.square().mean(dim=reduce_dim, keepdim=True), 1 - hp.normuon_beta2)
        scaled = O * second_moment.clamp_min(1e-10).rsqrt()
        O = scaled * (frobenius_norm(O) / frobenius_norm(scaled).clamp_min(1e-10))
    return O


@torch.no_grad()
def apply_direction(params: torch.Tensor, O: torch.Tensor, hp: MuonHyper, rows: int, cols: int) -> None:
    """P ← P·(1 − lr·wd·mask) − lr·scale·O in place, for (rows × cols) matrices. Elementwise,
    so any rows of `params` may be updated with the same rows of O apart from the others (an
    FSDP2 rank updates its shard); `rows`, `cols` are the whole matrix's shape."""
    # planted-bug target (parity_tests/mutants.py)
    if hp.weight_decay != 0:
        decay = hp.lr * hp.weight_decay
        if hp.cautious_weight_decay:
            # decay only where the step and the weight agree in sign (exact zeros decay too)
            # planted-bug target (parity_tests/mutants.py)
            params.sub_(params * (O * params >= 0), alpha=decay)
        else:
            params.mul_(1 - decay)
    # planted-bug target (parity_tests/mutants.py)
    params.add_(O, alpha=-hp.lr * shape_scale(rows, cols, hp.shape_scale))


@torch.no_grad()
def muon_step(
    params: torch.Tensor,
    grads: torch.Tensor,
    momentum_buf: torch.Tensor,
    second_moment: torch.Tensor | None,
    hp: MuonHyper,
) -> None:
    """One Muon step, in place, on fp32 stacks of shape (K, rows, cols): muon_direction, then
    apply_direction. `params`, `momentum_buf` and `second_moment` are updated in place;
    `grads` is read only. `second_moment` has shape (K, *normuon_state_shape(rows, cols))
    when NorMuon is on."""
    apply_direction(params, muon_direction(grads, momentum_buf, second_moment, hp).to(params.dtype),
                    hp, *params.shape[-2:])


class Muon(ShardedOptimizer):
    """Muon (.specs/muon_math.md; math in muon_step above).

    Parameters of one group with the same (matrix) shape, dtype and device form a stack, so
    one batched orthogonalizer call serves them all; at N ranks each rank owns ⌊K/N⌋ or ⌈K/N⌉
    matrices of a K-matrix stack, the remainders going where the Newton-Schulz cost is lowest
    (`owner_balance()` reports max ÷ mean). Work happens in fp32 copies; bf16 parameters are rounded
    once when written back. Gradients are never modified. Accepts `model.named_parameters()`
    groups with "param_names" so error messages name parameters. `nonfinite="raise"`
    (default) raises before anything is written when a gradient has NaN/inf; `"skip"` skips
    the whole step (state untouched). `orthogonalizer`: a name of registry.ORTHOGONALIZERS or a
    callable f(X, *, steps, eps, compute_dtype); a name's `ns_steps` must be one its schedule
    supports (registry.default_steps gives the published count). `row_equilibration` (MuonEq) and
    `frobenius_renormalization` (Muon+) wrap the orthogonalizer (balance.balanced; both off by
    default). `compile=True` runs the orthogonalizer (with those maps) through torch.compile,
    one graph per stack shape: the matmul part of the step. The elementwise rest stays eager:
    torch specialises the Python floats it scales by (`alpha=lr·…`), so compiling it would
    recompile whenever an lr or momentum schedule moves (measured: a new graph every step)."""

    kind = "muon"

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
                 orthogonalizer="newton_schulz", weight_decay=0.0, cautious_weight_decay=False,
                 normuon_beta2=None, shape_scale="max_ratio", ns_dtype=torch.bfloat16,
                 nonfinite="raise", process_group=None, track_stats=False, grad_reduce_dtype=torch.float32,
                 row_equilibration=False, frobenius_renormalization=False, compile=False):
        def check_hyper():
            if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
                raise ValueError(f"need lr ≥ 0, weight_decay ≥ 0, 0 ≤ momentum < 1; got "
                                 f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
            if normuon_beta2 is not None and not 0 <= normuon_beta2 < 1:
                raise ValueError(f"normuon_beta2 must be in [0, 1) or None, got {normuon_beta2}")
            if shape_scale not in SHAPE_SCALES:
                raise ValueError(f"unknown shape_scale {shape_scale!r}; valid: {', '.join(SHAPE_SCALES)}")
            check_orthogonalizer(orthogonalizer, ns_steps, ns_dtype)  # here, not at every step

        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        orthogonalizer=orthogonalizer, weight_decay=weight_decay,
                        cautious_weight_decay=cautious_weight_decay, normuon_beta2=normuon_beta2,
                        shape_scale=shape_scale, ns_dtype=ns_dtype, row_equilibration=row_equilibration,
                        frobenius_renormalization=frobenius_renormalization)
        self.compile = compile
        self._compiled: dict[tuple, Callable] = {}  # one compiled orthogonalizer per setting
        super().__init__(params, defaults, nonfinite=nonfinite, process_group=process_group,
                         track_stats=track_stats, grad_reduce_dtype=grad_reduce_dtype, check_hyper=check_hyper)

    def check_params(self) -> None:
        for group in self.param_groups:
            # a group's own orthogonalizer / ns_steps / ns_dtype, checked here like the defaults
            # (inside the collective construction check) rather than at the owners' first step
            check_orthogonalizer(group["orthogonalizer"], group["ns_steps"], group["ns_dtype"])
            for name, p in named_params(group):
                try:
                    as_matrix_shape(p.shape)
                except ValueError as e:
                    raise ValueError(f"parameter {name}: {e}") from None

    def place(self) -> dict[torch.Tensor, Placement]:
        """The owners (cost-balanced, placement.owner_counts) and `self.layouts`: per
        same-shape stack, the packed buffer the collectives move (placement.StackLayout; it
        keeps a group index, since load_state_dict replaces the group dicts)."""
        stacks = [(gi, stack) for gi, group in enumerate(self.param_groups)
                  for stack in same_shape_stacks(group["params"])]
        self.layouts, placements = muon_layouts(stacks, self.comm.world_size,
                                                [g["ns_steps"] for g in self.param_groups])
        return placements

    def buckets(self) -> list[Bucket]:
        """One per stack (bucket b is self.layouts[b]; at one rank the bucket only packs its
        gradients); none on FSDP2 stacks: FSDP reduced their gradients already (and a model's
        parameters are all FSDP2 DTensors, or none is)."""
        if any(layout.row_chunk is not None for layout in self.layouts):
            return []
        return [stack_bucket(layout, self.grad_reduce_dtype, self.comm.world_size) for layout in self.layouts]

    def owner_balance(self) -> float:
        """Newton-Schulz cost of the busiest rank ÷ the mean over ranks (1.0 = even)."""
        loads = owner_loads(self.layouts, self.placements, self.comm.world_size)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def orthogonalizer(self, group: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        """The group's orth of muon_direction: the named (or given) orthogonalizer bound to its
        settings, wrapped by MuonEq / Muon+ when asked, compiled once per setting with compile=True."""
        # .get: a group loaded from a state dict saved before these options existed lacks them;
        # it keeps what this optimizer was built with
        key = (group["orthogonalizer"], group["ns_steps"], group["ns_dtype"],
               group.get("row_equilibration", self.defaults["row_equilibration"]),
               group.get("frobenius_renormalization", self.defaults["frobenius_renormalization"]))
        if key in self._compiled:
            return self._compiled[key]
        orth = balanced(resolve_orthogonalizer(*key[:3]), *key[3:])
        if self.compile:
            self._compiled[key] = orth = torch.compile(orth, fullgraph=True, dynamic=False)
        return orth

    def hyper(self, group: dict) -> MuonHyper:
        return MuonHyper(
            lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            cautious_weight_decay=group["cautious_weight_decay"],
            normuon_beta2=group["normuon_beta2"], shape_scale=group["shape_scale"],
            orthogonalize=self.orthogonalizer(group))

    def matrix_state(self, p: torch.Tensor, normuon: bool) -> dict:
        """Per-parameter fp32 state, created lazily (momentum, and NorMuon's second moment);
        whole matrices, also for an FSDP2 parameter (they live on its owner)."""
        state = self.state[p]
        rows, cols = as_matrix_shape(p.shape)
        device = p.to_local().device if isinstance(p, DTensor) else p.device
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(rows, cols, dtype=torch.float32, device=device)
        if normuon and "second_moment" not in state:
            state["second_moment"] = torch.zeros(normuon_state_shape(rows, cols),
                                                 dtype=torch.float32, device=device)
        return state

    @torch.no_grad()
    def with_stacked_state(self, params: list[torch.Tensor], hp: MuonHyper, math: Callable) -> torch.Tensor | None:
        """`math(M, V)` on the stacked fp32 state of `params` (momentum M, NorMuon's second moment
        V or None), which it updates in place; the state is written back per parameter."""
        normuon = hp.normuon_beta2 is not None
        states = [self.matrix_state(p, normuon) for p in params]
        M = torch.stack([s["momentum_buffer"] for s in states])
        V = torch.stack([s["second_moment"] for s in states]) if normuon else None
        out = math(M, V)
        for i, s in enumerate(states):
            s["momentum_buffer"].copy_(M[i])
            if normuon:
                s["second_moment"].copy_(V[i])
        return out

    @torch.no_grad()
    def update_whole(self, params: list[torch.Tensor], grads: torch.Tensor, hp: MuonHyper) -> None:
        """`muon_step` on whole same-shape `params` given their stacked fp32 (K, rows, cols)
        gradients; the new values written back in the parameters' dtype."""
        rows, cols = grads.shape[-2:]
        P = torch.stack([p.detach().reshape(rows, cols) for p in params]).float()
        self.with_stacked_state(params, hp, lambda M, V: muon_step(P, grads, M, V, hp))
        for i, p in enumerate(params):
            p.copy_(P[i].view_as(p))

    @torch.no_grad()
    def directions(self, params: list[torch.Tensor], grads: torch.Tensor, hp: MuonHyper) -> torch.Tensor:
        """`muon_direction` of whole same-shape `params` (an FSDP2 owner's): their O, for every
        rank to apply to its rows."""
        return self.with_stacked_state(params, hp, lambda M, V: muon_direction(grads, M, V, hp))

    def count_work(self, layout: StackLayout, matrices: int) -> None:
        self.count_step_work(matrices=matrices, ns_cost=matrices * layout.cost)

    @torch.no_grad()
    def apply_update(self, grads_synced: bool = False) -> None:
        self.begin_update(grads_synced)
        n, rank = self.comm.world_size, self.comm.rank

        # 2. reduce: each stack's gradients reduce_scattered by its bucket (rank r receives its own
        #    matrices, sharding/backward_reduce.py). FSDP2 stacks (gradients already reduced, by rows):
        #    one all_to_all sends each owner the rows of its matrices (sharding/row_owners.py)
        pending, relayouts = [], []
        hypers = [self.hyper(group) for group in self.param_groups]  # once per group, not per stack
        for b, layout in enumerate(self.layouts):
            if not any(self.has_grad(p) for p in layout.params):  # presence is identical on all ranks
                continue
            hp = hypers[layout.group_index]
            if layout.row_chunk is not None:
                relayouts.append((hp, RowsToOwners(layout, self.comm)))
            else:
                pending.append((hp, layout, self.reduction(b)))

        # 3. update: per stack, wait for its gradients, step the matrices this rank holds (their
        #    slots are rank·chunk + j in stack order, so recv[j] is owned[j]), launch the gather.
        #    FSDP2 stacks: the owner computes the direction of its whole matrices and one
        #    all_to_all sends every rank its rows of it (while later stacks are still moving)
        for hp, relayout in relayouts:
            owned, G = relayout.owned_gradients()
            relayout.send_back(self.directions(owned, G, hp) if owned else None)
            self.count_work(relayout.layout, len(owned))
        gathers = []
        for hp, layout, reduction in pending:
            recv = reduction.wait()
            owned = [p for p in layout.params if self.placement(p).holds(rank)]
            active = [j for j, p in enumerate(owned) if self.has_grad(p)]
            if active:
                grads = recv[:len(owned)] if len(active) == len(owned) else recv[active]
                self.update_whole([owned[j] for j in active], grads.float(), hp)
                self.count_work(layout, len(active))
            if n > 1:
                rows, cols = recv.shape[-2:]
                mine = torch.zeros(layout.chunk, rows, cols, dtype=layout.params[0].dtype, device=recv.device)
                for j, p in enumerate(owned):
                    mine[j].copy_(p.reshape(rows, cols))
                out = torch.empty(layout.chunk * n, rows, cols, dtype=mine.dtype, device=mine.device)
                # `mine` stays referenced until the wait (c10d's Work holds it too; keeping it
                # here does not depend on that, nor on a backend's stream bookkeeping)
                gathers.append((layout, mine, out, self.comm.all_gather(out, mine)))

        # 4. gather: every rank takes the owners' new parameters; on FSDP2 stacks every rank
        #    applies the direction to its own rows
        for hp, relayout in relayouts:
            local, D = relayout.local_results()
            if local:
                P = torch.stack([t.reshape(D.shape[1:]) for t in local]).float()
                apply_direction(P, D, hp, relayout.rows, relayout.cols)
                for t, new in zip(local, P):
                    # planted-bug target (parity_tests/mutants.py)
                    t.copy_(new.view_as(t))
        for layout, _mine, out, work in gathers:
            work.wait()
            for p, slot in zip(layout.params, layout.slots):
                # planted-bug target (parity_tests/mutants.py)
                p.copy_(out[slot].view_as(p))


class DistMuon(Muon):
    """Muon over a process group: `process_group=None` means the default group (if one is
    initialized; otherwise this process alone). Otherwise Muon's arguments."""

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, process_group=default_group(process_group), **kwargs)
