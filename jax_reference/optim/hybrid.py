"""The nanochat hybrid optimizer: Muon for block matrices, AdamW for the rest.

The split, the learning rates and the shared non-finite check are
.specs/muon_math.md §10 (nanochat, https://github.com/karpathy/nanochat).
Parameters are a flat dict keyed by torch-style names
("transformer.h.0.attn.c_q.weight", "transformer.wte.weight", "lm_head.weight", ...).
"""

from collections.abc import Callable

import jax.numpy as jnp
import optax

from jax_reference.optim.adamw import adamw
from jax_reference.optim.muon import muon
from jax_reference.optim.nonfinite import guard_nonfinite

# Module wrappers of the torch side rename parameters (torch.compile's "_orig_mod.",
# activation checkpointing's "_checkpoint_wrapped_module.", FSDP1's "_fsdp_wrapped_module.", a
# leading DDP "module."); names exported from such a model are labelled by the canonical name.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """The parameter's name in the unwrapped model."""
    parts = [part for part in name.split(".") if part not in WRAPPER_SEGMENTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def label_param(name: str, shape) -> str:
    """Group of a parameter ("muon", "embedding", "unembedding" or "scalar") by its canonical
    name, §10 eq. (14)."""
    name = canonical_name(name)
    if len(shape) >= 2 and name.startswith("transformer.h."):
        return "muon"
    if "wte" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "unembedding"
    return "scalar"


def hybrid(
    params: dict,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    scalar_lr: float = 0.5,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    model_dim: int | None = None,
    lr_multiplier: Callable | None = None,
    **muon_kwargs,
) -> optax.GradientTransformationExtraArgs:
    """optax.multi_transform over the groups of label_param (§10).

    lr_multiplier(step) (step = number of steps taken, 0 first) multiplies
    every group's learning rate: each group gets the optax schedule
    step ↦ lr·lr_multiplier(step) and evaluates it at its own step count. All
    groups step together (a "skip" step is skipped by all of them), so the
    counts agree. Under jit the multiplier receives a traced int32, so it must
    be written with jnp / optax schedules.

    The nonfinite policy (muon_kwargs["nonfinite"], default "raise") is also
    applied once to the whole gradient dict, so "skip" skips every group
    together rather than only the group holding the bad gradient.
    """
    labels = {name: label_param(name, jnp.shape(p)) for name, p in params.items()}
    width = 1.0 if model_dim is None else (model_dim / 768) ** -0.5
    nonfinite = muon_kwargs.get("nonfinite", "raise")

    def lr(base: float):
        if lr_multiplier is None:
            return base
        return lambda step: base * lr_multiplier(step)

    def adam_group(base: float):
        b1, b2 = adam_betas
        return adamw(lr(base * width), b1, b2, adam_eps, adam_weight_decay, nonfinite=nonfinite)

    transforms = {
        "muon": muon(learning_rate=lr(matrix_lr), **muon_kwargs),
        "embedding": adam_group(embedding_lr),
        "unembedding": adam_group(unembedding_lr),
        "scalar": adam_group(scalar_lr),
    }
    return guard_nonfinite(optax.multi_transform(transforms, labels), nonfinite)
