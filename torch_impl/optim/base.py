"""What Muon and AdamW share: one optimizer class per kind serves one process and a sharded
process group alike, as in nanochat's optimizer (https://github.com/karpathy/nanochat,
nanochat/optim.py): with one rank (or no process group) the collectives are skipped, not
re-implemented. `step()` runs nanochat's phases:

    1. check   one collective over per-parameter flags (gradient non-finite / present); the
               non-finite policy (optim/nonfinite.py) raises or skips on every rank
    2. reduce  launch every gradient reduction before any compute: a reduce_scatter(AVG) per
               bucket (sharding/backward_reduce.py: a padded Muon stack or an AdamW row-sharded
               parameter), one all_reduce(AVG) of the small AdamW gradients
    3. update  per stack / parameter: wait for its gradients, run the math on what this rank
               holds, launch the all_gather of the new values
    4. gather  wait for the gathers and copy the new values into every rank's parameters

Phases 2-4 are each kind's `apply_update` (optim/muon.py, optim/adamw.py). Where each
parameter's work and state live is `placement(p)` (sharding/placement.py), computed once at
construction from the full parameter list, with the reduce_scatter buckets that go with it
(`buckets()`, handed to a GradientReducer that launches them at the step or in backward).

Communication per step at N ranks: reduce_scatter + all_gather send 2·(N−1)/N of the stacks'
bytes per rank, the same as one all_reduce of the gradients, while Newton-Schulz work per rank
drops from K to ⌊K/N⌋ or ⌈K/N⌉ matrices of a K-matrix stack. Gradients travel in
`grad_reduce_dtype` (fp32 by default: the math is fp32), parameters in their dtype.

Failures are collective, so every rank raises together instead of hanging: different
parameter lists across ranks or a construction error on one rank (one small all_gather at
construction), a gradient present on some ranks only, and non-finite gradients (the check of
phase 1). Anything else (a crashed rank) is bounded by the process group's finite timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torch_impl.optim.nonfinite import check_policy, gradients_ok
from torch_impl.sharding.backward_reduce import Bucket, GradientReducer, Reduction, reducing_in_backward
from torch_impl.sharding.checks import check_same_on_all_ranks, grad_flags, local_device_error, param_signature
from torch_impl.sharding.comm import Comm, is_initialized
from torch_impl.sharding.placement import Placement


def mesh_group(params: list) -> object | None:
    """The process group of the DTensor parameters' device mesh (FSDP2), None without DTensors.
    ValueError if they live on several meshes."""
    flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    meshes = {p.device_mesh for p in flat if isinstance(p, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError(f"the DTensor parameters live on {len(meshes)} device meshes; pass the process "
                         "group to shard over")
    (mesh,) = meshes
    return mesh.get_group()


class ShardedOptimizer(torch.optim.Optimizer):
    """The process group, the collective construction check, the placements, the phase-1 check
    and `step()`. Subclasses implement `check_params`, `place`, `buckets` and `apply_update`.

    process_group: None runs on this process alone (no collective, whatever group exists),
    unless the parameters are DTensors (FSDP2): then their mesh's group; a group shards the
    work and state over its ranks. track_stats: count bytes per collective and the work done
    on this rank in `self.stats` (a sharding.comm.CommStats)."""

    kind: str  # the part name in checkpoints and HybridOptimizer: "muon" or "adamw"

    def __init__(self, params, defaults: dict, *, nonfinite: str, process_group, track_stats: bool,
                 grad_reduce_dtype: torch.dtype = torch.float32, check_hyper=lambda: None,
                 signature_extra: str = ""):
        params = list(params)
        error = None
        try:
            if process_group is None:
                process_group = mesh_group(params)
        except ValueError as e:
            error = e
        self.comm = Comm.local(track_stats) if process_group is None else Comm(process_group, track_stats)
        self.grad_reduce_dtype = grad_reduce_dtype
        try:  # a local error is raised only after telling the other ranks (they would hang)
            if error:
                raise error
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
        self.reducer = GradientReducer(self.comm, self.buckets())

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
        self.reducer = GradientReducer(self.comm, self.buckets())

    def placement(self, p: torch.Tensor) -> Placement:
        """Where `p`'s work and state live at this optimizer's world size."""
        return self.placements[p]

    def check_params(self) -> None:
        """Raise ValueError for a parameter this optimizer cannot take."""

    def place(self) -> dict[torch.Tensor, Placement]:
        raise NotImplementedError

    def buckets(self) -> list[Bucket]:
        """The reduce_scatter buckets of the placed parameters (launched with no collective at
        one rank, and never from backward hooks there)."""
        return []

    def apply_update(self, grads_synced: bool = False) -> None:
        """Phases 2-4. `grads_synced`: phase 1 already ran on these gradients; otherwise
        (a direct `step(check_finite=False)`) gradient presence is still checked
        collectively, so a rank with a missing gradient raises everywhere instead of hanging."""
        raise NotImplementedError

    def bad_gradients(self, param_groups: list[dict], reduced: dict | None = None) -> list[str]:
        """Phase 1: names of parameters in `param_groups` whose gradient is non-finite on any
        rank (one collective; raises on every rank if a gradient is present on some only).
        `reduced`: gradients dropped after an early reduction, default this optimizer's."""
        return grad_flags(self.comm, param_groups, check_finite=True,
                          reduced=self.reducer.flags if reduced is None else reduced)

    def begin_update(self, grads_synced: bool) -> None:
        """Start of phases 2-4: count the step; without phase 1, check gradient presence."""
        if self.stats is not None:
            self.stats.steps += 1
        if not grads_synced and self.comm.world_size > 1:
            grad_flags(self.comm, self.param_groups, check_finite=False, reduced=self.reducer.flags)

    def reduce_in_backward(self, loss: torch.Tensor):
        """Context manager around the last micro-batch's `loss.backward()`: each reduce_scatter
        bucket is launched as soon as its gradients are accumulated, and the full gradients
        dropped (sharding/backward_reduce.py). Nothing changes at one rank."""
        return reducing_in_backward([self.reducer], loss, self.comm, self.param_groups)

    def reduction(self, bucket: int) -> Reduction:
        """Phase 2 for one bucket: the reduction launched in backward, else launched now."""
        return self.reducer.reduction(bucket)

    def has_grad(self, p: torch.Tensor) -> bool:
        """p has a gradient this step (possibly already reduced and dropped in backward)."""
        return self.reducer.has_grad(p)

    def count_step_work(self, matrices: int = 0, ns_cost: int = 0, elements: int = 0) -> None:
        """Add to the work counters of `stats` (a no-op without them)."""
        if self.stats is not None:
            self.stats.matrices += matrices
            self.stats.ns_cost += ns_cost
            self.stats.elements += elements

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.reducer.clear()

    @torch.no_grad()
    def step(self, closure=None, check_finite: bool = True):
        """`check_finite=False` when the caller already ran `bad_gradients` on these groups.
        Returns the closure's loss (None without one); a skipped step changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self.reducer.consumed():
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


def default_group(process_group):
    """The group a Dist optimizer shards over: the given one, else the default group if one
    is initialized, else None (this process alone)."""
    if process_group is not None:
        return process_group
    return dist.group.WORLD if is_initialized() else None
