"""The nanochat hybrid optimizer: Muon for block matrices, AdamW for the rest.

nanochat (https://github.com/karpathy/nanochat) trains the 2-D weights inside the
transformer blocks with Muon and everything else with AdamW in three groups (token
embedding, lm_head, scalars), whose learning rates shrink as (model_dim/768)^-½ with
width. `HybridOptimizer` steps, zeroes, schedules and checkpoints the pair together.
With `distributed=True` the pair is DistMuon + DistAdamW (ZeRO-2 sharded).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from torch_impl.adamw import AdamW
from torch_impl.finite import gradients_ok
from torch_impl.muon import Muon

GROUPS = ("muon", "embedding", "unembedding", "scalar")


def label_param(name: str, shape) -> str:
    """Which optimizer group a parameter joins; the first matching rule wins."""
    if len(shape) >= 2 and name.startswith("transformer.h."):
        return "muon"
    if "wte" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "unembedding"
    return "scalar"


class HybridOptimizer:
    """Muon + AdamW that act as one optimizer.

    Every group remembers its `initial_lr`; `set_lr_multiplier(m)` sets lr = m·initial_lr
    everywhere (the schedule), `set_muon_momentum` drives nanochat's momentum warmup.
    The non-finite check runs once over all gradients before either optimizer writes, so
    "skip" skips both and "raise" leaves both untouched."""

    def __init__(self, muon: torch.optim.Optimizer | None, adamw: torch.optim.Optimizer | None,
                 nonfinite: str = "raise"):
        self.optimizers = {k: o for k, o in (("muon", muon), ("adamw", adamw)) if o is not None}
        self.nonfinite = nonfinite
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def gradients_ok(self) -> bool:
        # Both parts are of one kind (local, or distributed with a global check that also
        # verifies gradient presence): either part's check covers all groups in one pass.
        first = next(iter(self.optimizers.values()))
        return gradients_ok(self.nonfinite, first.nonfinite_names(self.param_groups))

    @torch.no_grad()
    def step(self) -> bool:
        """One step of both optimizers. Returns False if a non-finite gradient skipped it."""
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
    **muon_kwargs,
) -> HybridOptimizer:
    """Split parameters the nanochat way and build the optimizer pair.

    The three AdamW groups' learning rates are multiplied by (model_dim/768)^-½ when
    `model_dim` is given; `muon_kwargs` go to Muon (momentum, weight_decay, ...)."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {k: [] for k in GROUPS}
    for name, p in named_params:
        if p.requires_grad:
            groups[label_param(name, p.shape)].append((name, p))
    width = 1.0 if model_dim is None else (model_dim / 768) ** -0.5
    adam_lrs = {"embedding": embedding_lr, "unembedding": unembedding_lr, "scalar": scalar_lr}
    adam_groups = [
        dict(params=[p for _, p in groups[k]], param_names=[n for n, _ in groups[k]],
             lr=lr * width, label=k)
        for k, lr in adam_lrs.items() if groups[k]
    ]
    if distributed:
        from torch_impl.dist_adamw import DistAdamW as AdamCls
        from torch_impl.dist_muon import DistMuon as MuonCls
    else:
        AdamCls, MuonCls = AdamW, Muon
    muon = MuonCls(groups["muon"], lr=matrix_lr, nonfinite=nonfinite, **muon_kwargs) if groups["muon"] else None
    adamw = AdamCls(adam_groups, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay,
                    nonfinite=nonfinite) if adam_groups else None
    return HybridOptimizer(muon, adamw, nonfinite)
