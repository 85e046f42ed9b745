"""Muon (with optional NorMuon and cautious weight decay) as an optax transformation.

Muon (https://kellerjordan.github.io/posts/muon/) orthogonalizes the momentum
of each weight matrix. Per matrix P (rows, cols) with gradient G, step count t
(starting at 0) and lr = learning_rate(t):

  1. buf ← buf + (1−μ)(G − buf)                      EMA momentum
  2. U = G + μ(buf − G) if nesterov else buf
  3. O = orth(U)                                     Newton-Schulz / Polar Express
  4. NorMuon (https://arxiv.org/abs/2510.05491, as in nanochat), if β2 is set:
       reduce over cols if rows >= cols else over rows,
       v ← v + (1−β2)(mean(O², reduced axis) − v),   D = 1/sqrt(max(v, 1e-10)),
       O ← O·D · ‖O‖_F / max(‖O·D‖_F, 1e-10)        (same Frobenius norm)
  5. scale = max(1, rows/cols)^½ ("max_ratio", nanochat) or
             0.2·sqrt(max(rows, cols)) ("match_rms_adamw", Moonlight)
  6. mask = 1, or (O·P >= 0) with cautious weight decay
     P' = P − lr·wd·mask·P − lr·scale·O              (decay is not shape-scaled)

N-D leaves are viewed as (shape[0], prod(shape[1:])). All math is float32
whatever the param dtype; the update is cast back to the param dtype.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jax_reference import _finite
from jax_reference.orthogonalize import NS5_COEFFS, newton_schulz, polar_express

ORTHOGONALIZERS = {
    "newton_schulz": functools.partial(newton_schulz, coeffs=NS5_COEFFS),
    "polar_express": polar_express,
}
SHAPE_SCALES = ("max_ratio", "match_rms_adamw")


class MuonState(NamedTuple):
    count: jax.Array  # int32 scalar, number of steps taken
    momentum: optax.Updates  # float32, shaped like params
    second_moment: Optional[optax.Updates]  # float32 (rows, 1) or (1, cols); None without NorMuon


def as_matrix_shape(shape) -> tuple[int, int]:
    """(rows, cols) view of an N-D parameter: rows = shape[0]."""
    return shape[0], math.prod(shape[1:])


def second_moment_shape(rows: int, cols: int) -> tuple[int, int]:
    # NorMuon keeps one statistic per row of the long side.
    return (rows, 1) if rows >= cols else (1, cols)


def shape_scale_factor(rows: int, cols: int, shape_scale: str) -> float:
    if shape_scale == "max_ratio":
        return max(1.0, rows / cols) ** 0.5
    if shape_scale == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"shape_scale must be one of {SHAPE_SCALES}, got {shape_scale!r}")


def normuon(O: jax.Array, v: jax.Array, beta2) -> tuple[jax.Array, jax.Array]:
    """Row/column-wise second-moment normalization that keeps ‖O‖_F."""
    rows, cols = O.shape
    axis = -1 if rows >= cols else -2
    v = v + (1 - beta2) * (jnp.mean(O * O, axis=axis, keepdims=True) - v)
    OD = O * jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    gain = jnp.linalg.norm(O) / jnp.maximum(jnp.linalg.norm(OD), 1e-10)
    return OD * gain, v


def muon_matrix_update(
    grad: jax.Array,
    param: jax.Array,
    buf: jax.Array,
    second_moment: Optional[jax.Array],
    *,
    learning_rate,
    momentum: float,
    nesterov: bool,
    orthogonalize: Callable[[jax.Array], jax.Array],
    weight_decay: float = 0.0,
    cautious_weight_decay: bool = False,
    normuon_beta2: Optional[float] = None,
    shape_scale: str = "max_ratio",
) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Steps 1-6 for one float32 (rows, cols) matrix.

    Returns (update, new_buf, new_second_moment) with update = P' − P.
    """
    rows, cols = grad.shape
    buf = buf + (1 - momentum) * (grad - buf)
    U = grad + momentum * (buf - grad) if nesterov else buf
    O = orthogonalize(U).astype(jnp.float32)
    if normuon_beta2 is not None:
        O, second_moment = normuon(O, second_moment, normuon_beta2)
    scale = shape_scale_factor(rows, cols, shape_scale)
    decay = weight_decay * param
    if cautious_weight_decay:
        # Decay only where update and weight agree in sign (zeros included).
        decay = jnp.where(O * param >= 0, decay, 0.0)
    update = -learning_rate * decay - (learning_rate * scale) * O
    return update, buf, second_moment


def _check_matrices(tree, what: str) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.ndim(x) < 2:
            raise ValueError(
                f"muon needs matrices (ndim >= 2) but {what} {jax.tree_util.keystr(path)} "
                f"has shape {tuple(jnp.shape(x))}; route it to AdamW instead"
            )


def _resolve_orthogonalizer(orthogonalizer) -> Callable:
    if callable(orthogonalizer):
        return orthogonalizer
    if orthogonalizer in ORTHOGONALIZERS:
        return ORTHOGONALIZERS[orthogonalizer]
    raise ValueError(f"orthogonalizer must be a callable or one of {tuple(ORTHOGONALIZERS)}, got {orthogonalizer!r}")


def muon(
    learning_rate: Union[float, optax.Schedule],
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    orthogonalizer: Union[str, Callable[..., Any]] = "newton_schulz",
    weight_decay: float = 0.0,
    cautious_weight_decay: bool = False,
    normuon_beta2: Optional[float] = None,
    shape_scale: str = "max_ratio",
    ns_dtype=jnp.bfloat16,
    eps: float = 1e-7,
    nonfinite: str = "raise",
) -> optax.GradientTransformationExtraArgs:
    """Muon as an optax.GradientTransformation; `update` needs params.

    Args:
      learning_rate: float, or optax schedule evaluated at the step count
        (0 on the first step).
      orthogonalizer: "newton_schulz" (NS5 coefficients), "polar_express", or
        a callable f(X, steps=..., eps=..., compute_dtype=...).
      ns_steps, eps, ns_dtype: passed to the orthogonalizer as steps, eps,
        compute_dtype.
      nonfinite: "raise": a NaN/inf gradient is a ValueError naming the leaf
        (eager), or a checkify.check under tracing, so run the jitted update
        through checkify.checkify (a plain jit of a "raise" transformation
        fails to lower); "skip": the step becomes a no-op (zero updates,
        state and count unchanged), jit-friendly. See jax_reference._finite.
      Other arguments: see the module docstring.

    Every leaf must have ndim >= 2 (ValueError naming the leaf otherwise).
    """
    orth = functools.partial(
        _resolve_orthogonalizer(orthogonalizer), steps=ns_steps, eps=eps, compute_dtype=ns_dtype
    )
    shape_scale_factor(2, 1, shape_scale)  # validate the name now, not at the first step
    _finite.check_mode(nonfinite)
    matrix_update = functools.partial(
        muon_matrix_update,
        momentum=momentum,
        nesterov=nesterov,
        orthogonalize=orth,
        weight_decay=weight_decay,
        cautious_weight_decay=cautious_weight_decay,
        normuon_beta2=normuon_beta2,
        shape_scale=shape_scale,
    )

    def init_fn(params):
        _check_matrices(params, "param")
        buf = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        v = None
        if normuon_beta2 is not None:
            v = jax.tree.map(
                lambda p: jnp.zeros(second_moment_shape(*as_matrix_shape(jnp.shape(p))), jnp.float32), params
            )
        return MuonState(count=jnp.zeros([], jnp.int32), momentum=buf, second_moment=v)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        _check_matrices(updates, "gradient")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)

        grads, treedef = jax.tree.flatten(updates)
        ps = treedef.flatten_up_to(params)
        bufs = treedef.flatten_up_to(state.momentum)
        vs = [None] * len(grads) if state.second_moment is None else treedef.flatten_up_to(state.second_moment)

        out_u, out_buf, out_v = [], [], []
        for g, p, buf, v in zip(grads, ps, bufs, vs):
            shape = jnp.shape(p)
            as2d = lambda x: jnp.reshape(x, as_matrix_shape(shape)).astype(jnp.float32)
            u, buf, v = matrix_update(as2d(g), as2d(p), as2d(buf), v, learning_rate=lr)
            out_u.append(jnp.reshape(u, shape).astype(jnp.result_type(p)))
            out_buf.append(jnp.reshape(buf, shape))
            out_v.append(v)

        new_state = MuonState(
            count=optax.safe_increment(state.count),
            momentum=treedef.unflatten(out_buf),
            second_moment=None if state.second_moment is None else treedef.unflatten(out_v),
        )
        return treedef.unflatten(out_u), new_state

    return _finite.guard_nonfinite(optax.GradientTransformation(init_fn, update_fn), nonfinite)
