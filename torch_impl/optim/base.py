"""Muon and AdamW at every world size, and the nanochat hybrid of the two.

One class per optimizer kind serves one process and a sharded process group alike, as in
nanochat's optimizer (https://github.com/karpathy/nanochat, nanochat/optim.py): with one rank
(or no process group) the collectives are skipped, not re-implemented. The math lives once,
in `muon_step` (torch_impl/optim/muon.py) and `adamw_step` (torch_impl/optim/adamw.py); .specs/muon_math.md
states it for both frameworks. `step()` runs nanochat's phases:

    1. check   one collective over per-parameter flags (gradient non-finite / present); the
               non-finite policy (torch_impl/optim/nonfinite.py) raises or skips on every rank
    2. reduce  launch every gradient reduction before any compute: a reduce_scatter(AVG) per
               padded Muon stack or AdamW row-sharded parameter, one all_reduce(AVG) of the
               small AdamW gradients
    3. update  per stack / parameter: wait for its gradients, run the math on what this rank
               holds, launch the all_gather of the new values
    4. gather  wait for the gathers and copy the new values into every rank's parameters

Where each parameter's work and state live is `placement(p)` (torch_impl/sharding/placement.py),
computed once at construction from the full parameter list: Muon gives each matrix one owner
rank, balancing the ranks' Newton-Schulz cost (placement.owner_counts; ZeRO-1/2 style: state
on the owner only), and packs each same-shape stack by that layout (placement.StackLayout);
AdamW splits large parameters by rows (ZeRO-2) and replicates small ones, and takes FSDP2
DTensor parameters as ShardedRows (its rows, gradient already reduced by FSDP: no collective).
Muon on FSDP2 DTensors keeps the same owners; per stack, phase 2 is one all_to_all of the
gradient rows to the owners, phase 3 the owner's `muon_direction` and one all_to_all of the
direction's rows back, phase 4 every rank's `apply_direction` on its rows (ShardedStack).
At one rank everything is Replicated.

Communication per step at N ranks: reduce_scatter + all_gather send 2·(N−1)/N of the stacks'
bytes per rank, the same as one all_reduce of the gradients, while Newton-Schulz work per rank
drops from K to ⌊K/N⌋ or ⌈K/N⌉ matrices of a K-matrix stack. Gradients travel in fp32 (the math is
fp32; bf16 gradients are averaged exactly), parameters in their dtype.

Failures are collective, so every rank raises together instead of hanging: different
parameter lists across ranks or a construction error on one rank (one small all_gather at
construction), a gradient present on some ranks only, and non-finite gradients (the check of
phase 1). Anything else (a crashed rank) is bounded by the process group's finite timeout
(torch_impl/sharding/comm.py). `DistMuon` / `DistAdamW` are Muon / AdamW over the default group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torch_impl.optim.adamw import adamw_step
from torch_impl.optim.muon import (
    SHAPE_SCALES,
    MuonHyper,
    apply_direction,
    as_matrix_shape,
    balanced,
    check_orthogonalizer,
    muon_direction,
    muon_step,
    normuon_state_shape,
    resolve_orthogonalizer,
)
from torch_impl.optim.nonfinite import check_policy, gradients_ok
from torch_impl.sharding.backward_reduce import BackwardReduce, Reduction, reducing_in_backward
from torch_impl.sharding.comm import (
    Comm,
    check_same_on_all_ranks,
    grad_flags,
    is_initialized,
    local_device_error,
    named_params,
    param_signature,
)
from torch_impl.sharding.placement import (
    Placement,
    Rows,
    ShardedRows,
    StackLayout,
    muon_layouts,
    owner_loads,
    row_placements,
    same_shape_stacks,
)


class ShardedOptimizer(torch.optim.Optimizer):
    """What Muon and AdamW share: the process group, the collective construction check, the
    placements, the phase-1 check and `step()`. Subclasses implement `check_params`,
    `place` and `apply_update` (phases 2-4).

    process_group: None runs on this process alone (no collective, whatever group exists);
    a group shards the work and state over its ranks. track_stats: count bytes per
    collective and the work done on this rank in `self.stats` (a distributed.CommStats)."""

    kind: str  # the part name in checkpoints and HybridOptimizer: "muon" or "adamw"

    def __init__(self, params, defaults: dict, *, nonfinite: str, process_group, track_stats: bool,
                 grad_reduce_dtype: torch.dtype = torch.float32, check_hyper=lambda: None,
                 signature_extra: str = ""):
        params = list(params)
        self.comm = Comm.local(track_stats) if process_group is None else Comm(process_group, track_stats)
        self.grad_reduce_dtype = grad_reduce_dtype
        self.backward = BackwardReduce(self)
        error = None
        try:  # a local error is raised only after telling the other ranks (they would hang)
            if grad_reduce_dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"grad_reduce_dtype must be torch.float32 or torch.bfloat16, got {grad_reduce_dtype}")
            check_hyper()
            super().__init__(params, defaults)
            self.nonfinite = check_policy(nonfinite)
            self.check_params()
            placements = self.place()  # may raise too: a DTensor laid out other than FSDP2's
        except ValueError as e:
            error = e
        local = str(error) if error else (local_device_error(self.param_groups) if self.comm.world_size > 1
                                          else None)
        signature = "" if error else (f"{signature_extra}grad_reduce_dtype={grad_reduce_dtype}\n"
                                      + param_signature(self.param_groups))
        try:
            check_same_on_all_ranks(self.comm, signature, local, type(self).__name__)
        except ValueError:
            if error:
                raise error from None
            raise
        self.placements: dict[torch.Tensor, Placement] = placements

    @property
    def stats(self):
        return self.comm.stats

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's API (progressive unfreezing, ...): at one rank the placements are
        recomputed; a sharded optimizer's layout is agreed on by all ranks at construction, so
        there it raises (on every rank alike: the condition is the world size)."""
        if not hasattr(self, "placements"):  # torch.optim.Optimizer.__init__ adding the groups
            super().add_param_group(param_group)
            return
        if self.comm.world_size > 1:
            raise ValueError(f"add_param_group on a {type(self).__name__} sharded over "
                             f"{self.comm.world_size} ranks: build a new optimizer with every group")
        super().add_param_group(param_group)
        self.check_params()
        self.placements = self.place()

    def placement(self, p: torch.Tensor) -> Placement:
        """Where `p`'s work and state live at this optimizer's world size."""
        return self.placements[p]

    def check_params(self) -> None:
        """Raise ValueError for a parameter this optimizer cannot take."""

    def place(self) -> dict[torch.Tensor, Placement]:
        raise NotImplementedError

    def apply_update(self, grads_synced: bool = False) -> None:
        """Phases 2-4. `grads_synced`: phase 1 already ran on these gradients; otherwise
        (a direct `step(check_finite=False)`) gradient presence is still checked
        collectively, so a rank with a missing gradient raises everywhere instead of hanging."""
        raise NotImplementedError

    def bad_gradients(self, param_groups: list[dict], reduced: dict | None = None) -> list[str]:
        """Phase 1: names of parameters in `param_groups` whose gradient is non-finite on any
        rank (one all_reduce; raises on every rank if a gradient is present on some only).
        `reduced`: gradients dropped after an early reduction, default this optimizer's."""
        return grad_flags(self.comm, param_groups, check_finite=True,
                          reduced=self.backward.flags if reduced is None else reduced)

    def begin_update(self, grads_synced: bool) -> None:
        """Start of phases 2-4: count the step; without phase 1, check gradient presence."""
        if self.stats is not None:
            self.stats.steps += 1
        if not grads_synced and self.comm.world_size > 1:
            grad_flags(self.comm, self.param_groups, check_finite=False, reduced=self.backward.flags)

    # -- ZeRO-2 in backward (torch_impl/sharding/backward_reduce.py) ------------------------------------

    def reduce_in_backward(self, loss: torch.Tensor):
        """Context manager around the last micro-batch's `loss.backward()`: each reduce_scatter
        bucket is launched as soon as its gradients are accumulated, and the full gradients
        dropped (torch_impl/sharding/backward_reduce.py). Nothing changes at one rank."""
        return reducing_in_backward([self], loss, self.comm, self.param_groups)

    def reduction_buckets(self) -> list[tuple[torch.Tensor, ...]]:
        """The parameters reduced by one reduce_scatter each (none at one rank)."""
        return []

    def launch_reduction(self, bucket: int, comm: Comm) -> Reduction:
        """Pack bucket `bucket`'s gradients in `grad_reduce_dtype` and launch its reduce_scatter."""
        raise NotImplementedError

    def reduction(self, bucket: int) -> Reduction:
        """Phase 2 for one bucket: the reduction launched in backward, else launched now."""
        return self.backward.take(bucket) or self.launch_reduction(bucket, self.comm)

    def has_grad(self, p: torch.Tensor) -> bool:
        """p has a gradient this step (possibly already reduced and dropped in backward)."""
        return self.backward.has_grad(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.backward.clear()

    @torch.no_grad()
    def step(self, closure=None, check_finite: bool = True):
        """`check_finite=False` when the caller already ran `bad_gradients` on these groups.
        Returns the closure's loss (None without one); a skipped step changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self.backward.consumed():
            if check_finite and not gradients_ok(self.nonfinite, self.bad_gradients(self.param_groups)):
                return loss
            self.apply_update(grads_synced=check_finite)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        keep_saved_state_dtypes(self, state_dict)


def keep_saved_state_dtypes(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """After torch.optim.Optimizer.load_state_dict: that casts floating state to the
    parameter's dtype (fp32 momentum of bf16 parameters would become bf16) and keeps the
    caller's `step` tensors (updated in place later, so two optimizers loaded from one dict
    would share them). Install copies with the saved dtypes instead."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    by_id = dict(zip(saved_ids, params))
    for pid, saved in state_dict["state"].items():
        p = by_id[pid]
        for k, v in saved.items():
            if isinstance(v, torch.Tensor):
                opt.state[p][k] = v.clone() if k == "step" else v.to(device=p.device, copy=True)


class Muon(ShardedOptimizer):
    """Muon (.specs/muon_math.md; math in muon.muon_step).

    Parameters of one group with the same (matrix) shape, dtype and device form a stack, so
    one batched orthogonalizer call serves them all; at N ranks each rank owns ⌊K/N⌋ or ⌈K/N⌉
    matrices of a K-matrix stack, the remainders going where the Newton-Schulz cost is lowest
    (`owner_balance()` reports max ÷ mean). Work happens in fp32 copies; bf16 parameters are rounded
    once when written back. Gradients are never modified. Accepts `model.named_parameters()`
    groups with "param_names" so error messages name parameters. `nonfinite="raise"`
    (default) raises before anything is written when a gradient has NaN/inf; `"skip"` skips
    the whole step (state untouched). `orthogonalizer`: a name of muon.ORTHOGONALIZERS or a
    callable f(X, *, steps, eps, compute_dtype); a name's `ns_steps` must be one its schedule
    supports (muon.default_steps gives the published count). `row_equilibration` (MuonEq) and
    `frobenius_renormalization` (Muon+) wrap the orthogonalizer (muon.balanced; both off by
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
    def stack_step(self, params: list[torch.Tensor], grads: torch.Tensor, hp: MuonHyper,
                   whole: torch.Tensor | None) -> torch.Tensor:
        """Run the math on `params` (same shape) given their stacked fp32 (K, rows, cols)
        gradients, reading and writing their per-parameter state. `whole`: the stacked
        parameters, stepped in place by `muon_step`; None (FSDP2: no rank holds them whole):
        return `muon_direction`'s O for the ranks to apply to their rows."""
        normuon = hp.normuon_beta2 is not None
        states = [self.matrix_state(p, normuon) for p in params]
        M = torch.stack([s["momentum_buffer"] for s in states])
        V = torch.stack([s["second_moment"] for s in states]) if normuon else None
        out = muon_step(whole, grads, M, V, hp) if whole is not None else muon_direction(grads, M, V, hp)
        for i, s in enumerate(states):
            s["momentum_buffer"].copy_(M[i])
            if normuon:
                s["second_moment"].copy_(V[i])
        return out

    @torch.no_grad()
    def step_stack(self, params: list[torch.Tensor], grads: torch.Tensor, hp: MuonHyper) -> None:
        """`muon_step` on whole parameters `params` (same shape), written back in their dtype."""
        rows, cols = grads.shape[-2:]
        P = torch.stack([p.detach().reshape(rows, cols) for p in params]).float()
        self.stack_step(params, grads, hp, P)
        for i, p in enumerate(params):
            p.copy_(P[i].view_as(p))

    def reduction_buckets(self) -> list[tuple[torch.Tensor, ...]]:
        """One per stack (bucket b is self.layouts[b]); FSDP2 stacks have none: FSDP reduces."""
        if self.comm.world_size == 1:
            return []
        return [layout.params if layout.row_chunk is None else () for layout in self.layouts]

    def launch_reduction(self, bucket: int, comm: Comm) -> Reduction:
        """The stack's gradients packed by its layout (rank r's matrices at [r·chunk, r·chunk +
        count_r), zeros elsewhere) and reduce_scattered: rank r receives its own chunk."""
        layout = self.layouts[bucket]
        rows, cols = as_matrix_shape(layout.params[0].shape)
        send = torch.zeros(layout.chunk * comm.world_size, rows, cols, dtype=self.grad_reduce_dtype,
                           device=layout.params[0].device)
        for p, slot in zip(layout.params, layout.slots):
            if p.grad is not None:
                send[slot].copy_(p.grad.reshape(rows, cols))
        recv, work = comm.reduce_scatter_chunks(send)  # N = 1: `send` itself, no collective
        return Reduction(send, recv, work)

    def count_work(self, layout: StackLayout, matrices: int) -> None:
        if self.stats is not None:
            self.stats.matrices += matrices
            self.stats.ns_cost += matrices * layout.cost

    @torch.no_grad()
    def apply_update(self, grads_synced: bool = False) -> None:
        self.begin_update(grads_synced)
        comm, n, rank = self.comm, self.comm.world_size, self.comm.rank

        # 2. reduce: each stack's fp32 gradients packed by its layout (rank r's matrices at
        #    [r·chunk, r·chunk + count_r), zeros elsewhere); rank r receives its own chunk.
        #    FSDP2 stacks (gradients already reduced, by rows): one all_to_all sends each
        #    owner the rows of its matrices (ShardedStack)
        pending, relayouts = [], []
        hypers = [self.hyper(group) for group in self.param_groups]  # once per group, not per stack
        for b, layout in enumerate(self.layouts):
            if not any(self.has_grad(p) for p in layout.params):  # presence is identical on all ranks
                continue
            hp = hypers[layout.group_index]
            if layout.row_chunk is not None:
                relayouts.append(ShardedStack(layout, comm, hp))
                continue
            pending.append((hp, layout, self.reduction(b)))

        # 3. update: per stack, wait for its gradients, step the matrices this rank holds (their
        #    slots are rank·chunk + j in stack order, so recv[j] is owned[j]), launch the gather.
        #    FSDP2 stacks: the owner computes the direction of its whole matrices and one
        #    all_to_all sends every rank its rows of it (while later stacks are still moving)
        for relayout in relayouts:
            self.count_work(relayout.layout, relayout.direction(self))
        gathers = []
        for hp, layout, reduction in pending:
            recv = reduction.wait()
            owned = [p for p in layout.params if self.placement(p).holds(rank)]
            active = [j for j, p in enumerate(owned) if self.has_grad(p)]
            if active:
                grads = recv[:len(owned)] if len(active) == len(owned) else recv[active]
                self.step_stack([owned[j] for j in active], grads.float(), hp)
                self.count_work(layout, len(active))
            if n > 1:
                rows, cols = recv.shape[-2:]
                mine = torch.zeros(layout.chunk, rows, cols, dtype=layout.params[0].dtype, device=recv.device)
                for j, p in enumerate(owned):
                    mine[j].copy_(p.reshape(rows, cols))
                out = torch.empty(layout.chunk * n, rows, cols, dtype=mine.dtype, device=mine.device)
                # `mine` stays referenced until the wait (c10d's Work holds it too; keeping it
                # here does not depend on that, nor on a backend's stream bookkeeping)
                gathers.append((layout, mine, out, comm.all_gather(out, mine)))

        # 4. gather: every rank takes the owners' new parameters; on FSDP2 stacks every rank
        #    applies the direction to its own rows
        for relayout in relayouts:
            relayout.apply()
        for layout, _mine, out, work in gathers:
            work.wait()
            for p, slot in zip(layout.params, layout.slots):
                # planted-bug target (parity_tests/mutants.py)
                p.copy_(out[slot].view_as(p))


class ShardedStack:
    """One stack of FSDP2 DTensor matrices (sharded by rows) through a Muon step, the layout of
    torchtitan's and MaxText's sharded Muon: the gradient rows (FSDP reduced them already)
    go to the owner of each matrix in ONE packed all_to_all, the owner runs `muon_direction`
    on whole matrices, ONE all_to_all sends each rank its rows of the direction, and every
    rank runs `apply_direction` on its rows. Each all_to_all moves (N−1)/N of the active
    matrices' bytes per rank on average, the pair about one all_reduce (2·(N−1)/N); the
    math is the single-device math, so the result is bit-identical to it.

    The stack is in owner order (each owner a contiguous run, StackLayout), so each
    buffer is the concatenation of per-rank pieces in rank order and the received
    directions come back in stack order."""

    def __init__(self, layout: StackLayout, comm: Comm, hp: MuonHyper):
        self.layout, self.comm, self.hp = layout, comm, hp
        n, rank = comm.world_size, comm.rank
        self.active = [p for p in layout.params if p.grad is not None]
        self.rows, self.cols = as_matrix_shape(layout.params[0].shape)
        self.bounds = [Rows(self.rows, layout.row_chunk).local_rows(r) for r in range(n)]
        owner_of = dict(zip(layout.params, layout.owners()))
        self.counts = [0] * n
        for p in self.active:
            self.counts[owner_of[p]] += 1
        self.owned = [p for p in self.active if owner_of[p] == rank]
        row_elems = [(end - start) * self.cols for start, end in self.bounds]
        # gradients to the owners: my rows of each matrix, grouped by owner (= stack order)
        send = torch.cat([p.grad.to_local().reshape(-1) for p in self.active])
        self.grad_splits = ([c * row_elems[rank] for c in self.counts],
                            [len(self.owned) * e for e in row_elems])
        self.grads, self.work = comm.all_to_all(send, *self.grad_splits, kind="all_to_all_grads")
        self.send = send  # referenced until the wait (as in the gathers)

    def direction(self, opt: Muon) -> int:
        """Wait for the gradients, compute the owned matrices' direction, launch its return.
        Returns the number of matrices orthogonalized here."""
        self.work.wait()
        sent, received = self.grad_splits
        k = len(self.owned)
        if k:
            G = torch.empty(k, self.rows, self.cols, dtype=torch.float32, device=self.grads.device)
            for (start, end), piece in zip(self.bounds, self.grads.split(received)):
                G[:, start:end].copy_(piece.view(k, end - start, self.cols))
            O = opt.stack_step(self.owned, G, self.hp, None)
            # planted-bug target (parity_tests/mutants.py)
            send = torch.cat([O[:, start:end].reshape(-1) for start, end in self.bounds])
        else:
            send = torch.empty(0, dtype=torch.float32, device=self.grads.device)
        self.send = send
        # the directions back: the reverse of the gradients' splits
        self.directions, self.work = self.comm.all_to_all(send, received, sent, kind="all_to_all_directions")
        return k

    def apply(self) -> None:
        """Wait for this rank's rows of every direction; apply them to its parameter rows."""
        self.work.wait()
        start, end = self.bounds[self.comm.rank]
        if end == start:
            return
        local = [p.to_local() for p in self.active]
        P = torch.stack([t.reshape(end - start, self.cols) for t in local]).float()
        apply_direction(P, self.directions.view(len(local), end - start, self.cols), self.hp, self.rows, self.cols)
        for t, new in zip(local, P):
            # planted-bug target (parity_tests/mutants.py)
            t.copy_(new.view_as(t))


class AdamW(ShardedOptimizer):
    """AdamW (.specs/muon_math.md; math in adamw.adamw_step): the same arguments and results as
    torch.optim.AdamW (non-amsgrad), plus fp32 math for bf16 parameters, the `nonfinite`
    policy, and ZeRO-2 over `process_group`: parameters of ≥ `shard_min_numel` elements are
    split by rows (gradients reduce_scattered, moments ≈ 1/N per rank, rows all_gathered),
    smaller ones are all_reduced in one flat buffer and updated whole on every rank."""

    kind = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 nonfinite="raise", process_group=None, track_stats=False, shard_min_numel: int = 1024,
                 grad_reduce_dtype=torch.float32):
        def check_hyper():
            if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
                raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, "
                                 f"eps={eps}, weight_decay={weight_decay}")

        self.shard_min_numel = shard_min_numel
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite=nonfinite, process_group=process_group, track_stats=track_stats,
                         grad_reduce_dtype=grad_reduce_dtype, check_hyper=check_hyper,
                         signature_extra=f"shard_min_numel={shard_min_numel}\n")

    def place(self) -> dict[torch.Tensor, Placement]:
        params = [p for g in self.param_groups for p in g["params"]]
        return row_placements(params, self.comm.world_size, self.shard_min_numel)

    def param_state(self, p: torch.Tensor, like: torch.Tensor) -> dict:
        """fp32 moments shaped like `like` (the whole parameter, or this rank's rows)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        return state

    @staticmethod
    def hyper(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def reduction_buckets(self) -> list[tuple[torch.Tensor, ...]]:
        """One per row-sharded parameter (ZeRO-2), in group order. Fixed once placed (a
        sharded optimizer takes no new groups), so computed once."""
        if getattr(self, "_buckets", None) is None or self.comm.world_size == 1:
            self._buckets = [(p,) for g in self.param_groups for p in g["params"]
                             if type(self.placement(p)) is Rows]
            self._bucket_of = {bucket[0]: b for b, bucket in enumerate(self._buckets)}
        return self._buckets

    def launch_reduction(self, bucket: int, comm: Comm) -> Reduction:
        """The gradient zero-padded to chunk·N rows, reduce_scattered: rank r gets its rows."""
        (p,) = self.reduction_buckets()[bucket]
        place = self.placement(p)
        send = torch.zeros(place.chunk * comm.world_size, *p.shape[1:], dtype=self.grad_reduce_dtype,
                           device=p.device)
        send[:p.shape[0]].copy_(p.grad)
        recv, work = comm.reduce_scatter_chunks(send)
        return Reduction(send, recv, work)

    @torch.no_grad()
    def update(self, keys: list[torch.Tensor], params: list[torch.Tensor],
               grads: list[torch.Tensor], group: dict) -> None:
        """`adamw_step` on tensors `params` (whole params or row slices) whose state is keyed
        by `keys`. Non-fp32 tensors are updated through fp32 copies."""
        states = [self.param_state(k, p) for k, p in zip(keys, params)]
        for s in states:
            s["step"] += 1
        work = [p if p.dtype == torch.float32 else p.float() for p in params]
        adamw_step(work, [g.float() for g in grads], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], [int(s["step"]) for s in states],
                   **self.hyper(group))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    @torch.no_grad()
    def apply_update(self, grads_synced: bool = False) -> None:
        self.begin_update(grads_synced)
        comm, n, rank = self.comm, self.comm.world_size, self.comm.rank

        # 2. reduce: row-sharded parameters' fp32 gradients, zero-padded to c·N rows, each
        #    reduce_scattered; the replicated ones' gradients in one flat all_reduce (N > 1 only)
        sharded, small, fsdp = [], [], []
        self.reduction_buckets()  # sets self._bucket_of
        for group in self.param_groups:
            for p in group["params"]:
                if not self.has_grad(p):  # presence is identical on all ranks
                    continue
                place = self.placement(p)
                if isinstance(place, ShardedRows):  # FSDP2 reduced the gradient already
                    fsdp.append((group, p))
                    continue
                if not isinstance(place, Rows):
                    small.append((group, p))
                    continue
                sharded.append((group, p, place, self.reduction(self._bucket_of[p])))
        small_grads = [p.grad for _, p in small]
        if small and n > 1:
            flat = torch.cat([p.grad.reshape(-1).float() for _, p in small])
            small_work = comm.all_reduce(flat)
            small_grads = [g.view_as(p) for g, (_, p) in zip(flat.split([p.numel() for _, p in small]), small)]

        # 3. update: per sharded parameter, wait, update this rank's rows, launch the gather
        gathers = []
        for group, p, place, reduction in sharded:
            recv = reduction.wait()
            start, end = place.local_rows(rank)
            if end > start:
                self.update([p], [p[start:end]], [recv[:end - start]], group)
                if self.stats is not None:
                    self.stats.elements += p[start:end].numel()
            mine = torch.zeros(place.chunk, *p.shape[1:], dtype=p.dtype, device=p.device)
            mine[:end - start].copy_(p[start:end])
            out = torch.empty(place.chunk * n, *p.shape[1:], dtype=p.dtype, device=p.device)
            gathers.append((p, mine, out, comm.all_gather(out, mine)))  # `mine` kept alive to the wait

        #    FSDP2 parameters: this rank's rows of the parameter and of its reduced gradient
        for group in self.param_groups:
            mine = [p for grp, p in fsdp if grp is group and p.to_local().numel()]
            if mine:
                # planted-bug target (parity_tests/mutants.py)
                self.update(mine, [p.to_local() for p in mine], [p.grad.to_local() for p in mine], group)
                if self.stats is not None:
                    self.stats.elements += sum(p.to_local().numel() for p in mine)

        #    the replicated parameters: averaged gradients, updated whole on every rank
        if small:
            if n > 1:
                small_work.wait()
            for group in self.param_groups:
                mine = [(p, g) for (grp, p), g in zip(small, small_grads) if grp is group]
                if mine:
                    ps = [p for p, _ in mine]
                    self.update(ps, ps, [g for _, g in mine], group)
                    if self.stats is not None:
                        self.stats.elements += sum(p.numel() for p in ps)

        # 4. gather: every rank takes the owners' rows
        for p, _mine, out, work in gathers:
            work.wait()
            # planted-bug target (parity_tests/mutants.py)
            p.copy_(out[:p.shape[0]])


def default_group(process_group):
    """The group a Dist optimizer shards over: the given one, else the default group if one
    is initialized, else None (this process alone)."""
    if process_group is not None:
        return process_group
    return dist.group.WORLD if is_initialized() else None


class DistMuon(Muon):
    """Muon over a process group: `process_group=None` means the default group (if one is
    initialized; otherwise this process alone). Otherwise Muon's arguments."""

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, process_group=default_group(process_group), **kwargs)


class DistAdamW(AdamW):
    """AdamW (ZeRO-2) over a process group: `process_group=None` means the default group (if
    one is initialized; otherwise this process alone). Otherwise AdamW's arguments."""

    def __init__(self, params, *args, process_group=None, **kwargs):
        super().__init__(params, *args, process_group=default_group(process_group), **kwargs)


# -- the hybrid: nanochat's split ------------------------------------------------------------
# nanochat trains the 2-D weights inside the transformer blocks with Muon and everything else
# with AdamW in three groups (token embedding, lm_head, scalars) whose learning rates shrink as
# (model_dim/768)^-½ with width. `hybrid()` is the one place this split is written; the training
# entry point uses it for the AdamW-only baseline too.

GROUPS = ("muon", "embedding", "unembedding", "scalar")


# Wrappers rename modules: torch.compile adds "_orig_mod.", activation checkpointing
# "_checkpoint_wrapped_module.", FSDP1 "_fsdp_wrapped_module.", DDP a leading "module.". A
# split on raw names would misroute the wrapped parameters (a trap seen elsewhere), so it is
# decided on the canonical name.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """The parameter's name in the unwrapped model."""
    parts = [part for part in name.split(".") if part not in WRAPPER_SEGMENTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def label_param(name: str, shape) -> str:
    """Which optimizer group a parameter joins (on its canonical name); the first matching
    rule wins."""
    name = canonical_name(name)
    if len(shape) >= 2 and name.startswith("transformer.h."):
        return "muon"
    if "wte" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "unembedding"
    return "scalar"


class HybridOptimizer:
    """Muon + AdamW that act as one optimizer (.specs/muon_math.md, the hybrid split).

    Every group remembers its `initial_lr`; `set_lr_multiplier(m)` sets lr = m·initial_lr
    everywhere (the schedule), `set_muon_momentum` drives nanochat's momentum warmup.
    The non-finite check runs once over all gradients before either optimizer writes, so
    "skip" skips both and "raise" leaves both untouched. Both parts must use the same policy
    and the same process group (one collective check covers both)."""

    def __init__(self, muon: ShardedOptimizer | None, adamw: ShardedOptimizer | None,
                 nonfinite: str = "raise"):
        self.optimizers = {k: o for k, o in (("muon", muon), ("adamw", adamw)) if o is not None}
        self.nonfinite = check_policy(nonfinite)
        if not self.optimizers:
            raise ValueError("HybridOptimizer needs at least one of muon, adamw")
        policies = {k: o.nonfinite for k, o in self.optimizers.items()}
        if set(policies.values()) != {self.nonfinite}:
            raise ValueError(f"nonfinite={nonfinite!r} but the parts have {policies}: use one policy")
        groups = {k: (o.comm.is_local, o.comm.group) for k, o in self.optimizers.items()}
        if len(set(groups.values())) > 1:
            raise ValueError("the parts talk to different process groups (one local, one sharded, or two "
                             "groups); the single non-finite/presence check would not cover both")
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def gradients_ok(self) -> bool:
        # Both parts talk to the same group: either part's check covers all groups in one
        # collective (with both parts' gradients dropped after an early reduction).
        first = next(iter(self.optimizers.values()))
        reduced = {p: f for o in self.optimizers.values() for p, f in o.backward.flags.items()}
        return gradients_ok(self.nonfinite, first.bad_gradients(self.param_groups, reduced))

    def reduce_in_backward(self, loss: torch.Tensor):
        """Both parts' ZeRO-2 hooks armed for the last micro-batch's `loss.backward()`, with one
        presence check for both (ShardedOptimizer.reduce_in_backward)."""
        first = next(iter(self.optimizers.values()))
        return reducing_in_backward(list(self.optimizers.values()), loss, first.comm, self.param_groups)

    @torch.no_grad()
    def step(self) -> bool:
        """One step of both optimizers. Returns False if a non-finite gradient skipped it."""
        with ExitStack() as stack:
            for opt in self.optimizers.values():
                stack.enter_context(opt.backward.consumed())
            if not self.gradients_ok():
                return False
            for opt in self.optimizers.values():
                opt.apply_update(grads_synced=True)
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        if "muon" in self.optimizers:
            for group in self.optimizers["muon"].param_groups:
                group["momentum"] = momentum

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])


def hybrid(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    scalar_lr: float = 0.5,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    model_dim: int | None = None,
    distributed: bool = False,
    nonfinite: str = "raise",
    matrix_optimizer: str = "muon",
    adamw_matrix_lr: float = 0.003,
    grad_reduce_dtype: torch.dtype = torch.float32,
    track_stats: bool = False,
    **muon_kwargs,
) -> HybridOptimizer:
    """Split parameters the nanochat way and build the optimizer pair.

    Parameters are labelled and named (in messages and checkpoints) by their canonical name,
    so a compiled or checkpoint-wrapped model splits like the plain one; block parameters
    that none can go to Muon raise (a flattening wrapper would otherwise make the run
    AdamW-only without a word).
    The three AdamW groups' learning rates are multiplied by (model_dim/768)^-½ when
    `model_dim` is given; `muon_kwargs` go to Muon (momentum, weight_decay, ...);
    `grad_reduce_dtype` (the gradients' wire format in the reduce_scatters) and
    `track_stats` (byte and work counters, `opt.optimizers[k].stats`) to both.
    `matrix_optimizer="adamw"` is the AdamW-only baseline: the block matrices form a fourth
    AdamW group (first, label "matrix") with lr `adamw_matrix_lr` (not width-scaled) and
    Muon's `weight_decay`; the other groups are the same as in the hybrid."""
    if matrix_optimizer not in ("muon", "adamw"):
        raise ValueError(f"matrix_optimizer must be 'muon' or 'adamw', got {matrix_optimizer!r}")
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {k: [] for k in GROUPS}
    blocks = []
    for name, p in named_params:
        if p.requires_grad:
            name = canonical_name(name)
            groups[label_param(name, p.shape)].append((name, p))
            if name.startswith("transformer.h."):
                blocks.append((name, tuple(p.shape)))
    if matrix_optimizer == "muon" and blocks and not groups["muon"]:
        # e.g. parameters flattened to 1-D by a ZeRO-3 / FSDP1 wrapper: Muon would silently
        # get nothing and the run would be AdamW-only
        raise ValueError(f"the model has {len(blocks)} block parameters but none can go to Muon (none has "
                         f"≥ 2 dims: {blocks[:4]}...); were they flattened by a wrapper? Pass "
                         "matrix_optimizer='adamw' for an AdamW-only run")
    width = 1.0 if model_dim is None else (model_dim / 768) ** -0.5
    adam_lrs = {"embedding": embedding_lr, "unembedding": unembedding_lr, "scalar": scalar_lr}
    adam_groups = [
        dict(params=[p for _, p in groups[k]], param_names=[n for n, _ in groups[k]],
             lr=lr * width, label=k)
        for k, lr in adam_lrs.items() if groups[k]
    ]
    matrices = groups["muon"]
    if matrix_optimizer == "adamw":
        # The AdamW-only baseline: the block matrices become the first AdamW group, with their
        # own lr (not width-scaled) and Muon's weight decay. The Muon-only kwargs go unused.
        if matrices:
            adam_groups.insert(0, dict(params=[p for _, p in matrices], param_names=[n for n, _ in matrices],
                                       lr=adamw_matrix_lr, label="matrix",
                                       weight_decay=muon_kwargs.get("weight_decay", 0.0)))
        matrices = []
    AdamCls, MuonCls = (DistAdamW, DistMuon) if distributed else (AdamW, Muon)
    common = dict(nonfinite=nonfinite, grad_reduce_dtype=grad_reduce_dtype, track_stats=track_stats)
    muon = MuonCls(matrices, lr=matrix_lr, **common, **muon_kwargs) if matrices else None
    adamw = AdamCls(adam_groups, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay,
                    **common) if adam_groups else None
    return HybridOptimizer(muon, adamw, nonfinite)
