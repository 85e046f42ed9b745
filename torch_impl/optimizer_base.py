"""Plumbing shared by Muon, AdamW and their distributed variants.

`step()` runs the closure, applies the non-finite gradient policy once, then calls
`apply_update()`, where each optimizer's math (or its communication around the math)
lives. `nonfinite_names()` is local here; the distributed optimizers override it with a
single all_reduce that also checks every rank has the same set of gradients. After that
check, `apply_update(grads_synced=True)` needs no further collective; without it (a direct
`step(check_finite=False)`) the distributed optimizers still verify gradient presence, so a
rank with a missing gradient raises everywhere instead of hanging. HybridOptimizer runs the
check once for both of its parts and calls `apply_update(grads_synced=True)`.
"""

from __future__ import annotations

import torch

from torch_impl.finite import gradients_ok, named_grads, nonfinite_names


class StepOptimizer(torch.optim.Optimizer):
    nonfinite: str  # "raise" or "skip", set by subclasses via finite.check_policy

    def nonfinite_names(self, param_groups: list[dict]) -> list[str]:
        """Names of parameters in `param_groups` whose gradient holds NaN/inf."""
        return nonfinite_names(named_grads(param_groups))

    def apply_update(self, grads_synced: bool = False) -> None:
        """The update. `grads_synced`: `nonfinite_names` already ran on these gradients."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None, check_finite: bool = True):
        """`check_finite=False` when the caller already ran `nonfinite_names` on these groups."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if check_finite and not gradients_ok(self.nonfinite, self.nonfinite_names(self.param_groups)):
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
