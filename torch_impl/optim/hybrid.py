"""The nanochat hybrid: Muon for the 2-D weights inside the transformer blocks, AdamW for
everything else in three groups (token embedding, lm_head, scalars) whose learning rates shrink
as (model_dim/768)^-½ with width (.specs/muon_math.md §10). `hybrid()` is the one place this split
is written; the training entry point uses it for the AdamW-only baseline too. `HybridOptimizer`
makes the pair act as one optimizer, with one non-finite check over both.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack

import torch

from torch_impl.optim.adamw import AdamW, DistAdamW
from torch_impl.optim.base import ShardedOptimizer
from torch_impl.optim.muon import DistMuon, Muon
from torch_impl.optim.nonfinite import check_policy, gradients_ok
from torch_impl.sharding.backward_reduce import reducing_in_backward

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
        reduced = {p: f for o in self.optimizers.values() for p, f in o.reducer.flags.items()}
        return gradients_ok(self.nonfinite, first.bad_gradients(self.param_groups, reduced))

    def reduce_in_backward(self, loss: torch.Tensor):
        """Both parts' ZeRO-2 hooks armed for the last micro-batch's `loss.backward()`, with one
        presence check for both (ShardedOptimizer.reduce_in_backward)."""
        first = next(iter(self.optimizers.values()))
        return reducing_in_backward([o.reducer for o in self.optimizers.values()], loss, first.comm,
                                    self.param_groups)

    @torch.no_grad()
    def step(self) -> bool:
        """One step of both optimizers. Returns False if a non-finite gradient skipped it."""
        with ExitStack() as stack:
            for opt in self.optimizers.values():
                stack.enter_context(opt.reducer.consumed())
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
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
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
    for name, p in named_parameters:
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
