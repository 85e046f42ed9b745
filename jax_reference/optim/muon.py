"""Muon (with optional NorMuon and cautious weight decay) as an optax chain.

The math is .specs/muon_math.md §2–§7; this module is that spec written as
small optax transforms, applied in the spec's order:

    muon(...) = guard_nonfinite(in_float32(optax.chain(
        scale_by_orthogonalized_momentum(momentum, nesterov, orth),  # §3, §4: G ↦ O (orth_map, §12)
        scale_by_normuon(beta2),                                     # §5 (identity if beta2 is None)
        scale_by_shape(rule),                                        # §6: O ↦ s·O
        add_cautious_decayed_weights(wd)                             # §7: + wd·mask⊙P
          or optax.add_decayed_weights(wd),                          #     (mask = 1)
        optax.scale_by_learning_rate(lr),                            # §7: × (−lr)
    )), nonfinite)                                                   # §2 fp32, §9 policy

so the update is Δ = −lr·(s·O + wd·mask⊙P), eq. (9). With the MuonEq / Muon+
options (.specs/orthogonalizers.md §6) orth is `balanced`: O = renorm(orth(
equilibrate(U))), still in the §4 slot, so the chain and MuonState do not change.
Every transform works leaf by leaf through jax.tree.map; where the math needs a matrix, a leaf is
viewed as (shape[0], prod(shape[1:])) (§2) and reshaped back. The transforms
compute in float32 and return float32 updates; `muon` casts the final update
to the param dtype (jax_reference.optim.precision.in_float32).

The state is a MuonState: the chain's tuple of per-transform states as named fields,
plus read-only `momentum`, `second_moment` (None without NorMuon) and `count`
(steps taken); optax.tree_utils.tree_get(state, name) finds the same values.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jax_reference.optim.nonfinite import check_policy, guard_nonfinite
from jax_reference.optim.precision import in_float32
from jax_reference.orthogonalizers.balance import balanced
from jax_reference.orthogonalizers.registry import resolve_orthogonalizer
from jax_reference.sharding.sharded import on_owners, sharded

SHAPE_SCALES = ("max_ratio", "match_rms_adamw")


# ---- shapes (§2, §5, §6) -------------------------------------------------------------


def as_matrix_shape(shape) -> tuple[int, int]:
    """(rows, cols) view of an N-D parameter: (shape[0], prod(shape[1:])), §2."""
    if len(shape) < 2:
        raise ValueError(f"Muon needs parameters with ndim >= 2, got shape {tuple(shape)}")
    return shape[0], math.prod(shape[1:])


def normuon_state_shape(rows: int, cols: int) -> tuple[int, int]:
    """NorMuon keeps one second moment per row of the larger side, §5 eq. (4)."""
    return (rows, 1) if rows >= cols else (1, cols)


def shape_scale(rows: int, cols: int, rule: str) -> float:
    """The update multiplier s of §6 eq. (7) for a (rows, cols) matrix."""
    if rule == "max_ratio":
        return max(1.0, rows / cols) ** 0.5
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"shape_scale must be one of {SHAPE_SCALES}, got {rule!r}")


def check_matrices(tree, what: str) -> None:
    """ValueError naming the first leaf with ndim < 2 (Muon is for matrices, §2)."""

    def check(path, x):
        if jnp.ndim(x) < 2:
            raise ValueError(
                f"muon needs matrices (ndim >= 2) but {what} {jax.tree_util.keystr(path)} "
                f"has shape {tuple(jnp.shape(x))}; route it to AdamW instead"
            )

    jax.tree_util.tree_map_with_path(check, tree)


def _as_matrix(x) -> jax.Array:
    """float32 (rows, cols) view of a leaf (§2)."""
    return jnp.reshape(x, as_matrix_shape(jnp.shape(x))).astype(jnp.float32)


def _unzip(like, pairs):
    """A tree of 2-tuples, structured like `like`, as a 2-tuple of trees."""
    return jax.tree.transpose(jax.tree.structure(like), jax.tree.structure((0, 0)), pairs)


# ---- the transforms, in chain order --------------------------------------------------


class OrthogonalizedMomentumState(NamedTuple):
    momentum: optax.Updates  # float32 EMA buffer M of §3, shaped like params


def per_leaf(orthogonalize: Callable[[jax.Array], jax.Array], matrices):
    """The single-device orth_map: `orthogonalize` applied to each (rows, cols) matrix of the tree."""
    return jax.tree.map(orthogonalize, matrices)


def scale_by_orthogonalized_momentum(
    momentum: float,
    nesterov: bool,
    orthogonalize: Callable[[jax.Array], jax.Array],
    orth_map: Callable[..., Any] = per_leaf,
) -> optax.GradientTransformation:
    """G ↦ O = orth(U): EMA momentum and Nesterov (§3 eqs. 1–2), then orth (§4 eq. 3).

    `orthogonalize` maps a float32 (rows, cols) matrix to its approximate polar
    factor (e.g. resolve_orthogonalizer(...)). `orth_map(orthogonalize, matrices)`
    applies it to the tree of float32 (rows, cols) views of U, returning a tree
    of O: per_leaf (one matrix after the other) on one device,
    jax_reference.sharding.sharded.on_owners(mesh) for row-sharded parameters (§12).
    State: the momentum buffer. Leaves must have ndim >= 2 (ValueError naming
    the leaf otherwise).
    """

    def init_fn(params):
        check_matrices(params, "param")
        return OrthogonalizedMomentumState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

    def leaf(g, buf):
        g = jnp.asarray(g).astype(jnp.float32)
        buf = buf + (1 - momentum) * (g - buf)
        U = g + momentum * (buf - g) if nesterov else buf
        return _as_matrix(U), buf

    def update_fn(updates, state, params=None):
        del params
        check_matrices(updates, "gradient")
        U, buf = _unzip(updates, jax.tree.map(leaf, updates, state.momentum))
        O = orth_map(orthogonalize, U)
        O = jax.tree.map(lambda o, g: jnp.reshape(o.astype(jnp.float32), jnp.shape(g)), O, updates)
        return O, OrthogonalizedMomentumState(buf)

    return optax.GradientTransformation(init_fn, update_fn)


def normuon(O: jax.Array, v: jax.Array, beta2) -> tuple[jax.Array, jax.Array]:
    """One float32 (rows, cols) matrix through §5 eqs. (4)–(6): returns (new O, new v)."""
    rows, cols = O.shape
    axis = -1 if rows >= cols else -2
    v = v + (1 - beta2) * (jnp.mean(O * O, axis=axis, keepdims=True) - v)
    OD = O * jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    gain = jnp.linalg.norm(O) / jnp.maximum(jnp.linalg.norm(OD), 1e-10)
    return OD * gain, v


class NorMuonState(NamedTuple):
    second_moment: optax.Updates  # float32 v of §5, normuon_state_shape(rows, cols) per leaf


def scale_by_normuon(beta2: float) -> optax.GradientTransformation:
    """O ↦ NorMuon(O): per-row/column second-moment scaling keeping ‖O‖_F (§5).

    State: the second moment v, one per row of each leaf's larger side.
    """

    def init_fn(params):
        check_matrices(params, "param")
        zeros = lambda p: jnp.zeros(normuon_state_shape(*as_matrix_shape(jnp.shape(p))), jnp.float32)
        return NorMuonState(jax.tree.map(zeros, params))

    def leaf(u, v):
        O, v = normuon(_as_matrix(u), v, beta2)
        return jnp.reshape(O, jnp.shape(u)), v

    def update_fn(updates, state, params=None):
        del params
        check_matrices(updates, "update")
        O, v = _unzip(updates, jax.tree.map(leaf, updates, state.second_moment))
        return O, NorMuonState(v)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(rule: str) -> optax.GradientTransformation:
    """O ↦ s·O with s = shape_scale(rows, cols, rule) of each leaf (§6). Stateless."""
    shape_scale(2, 1, rule)  # validate the name now, not at the first step

    def update_fn(updates, state, params=None):
        del params
        check_matrices(updates, "update")
        scaled = jax.tree.map(lambda u: u * shape_scale(*as_matrix_shape(jnp.shape(u)), rule), updates)
        return scaled, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def add_cautious_decayed_weights(weight_decay: float) -> optax.GradientTransformation:
    """u ↦ u + wd·mask⊙P, mask = 1[u⊙P ≥ 0]: cautious decoupled decay, §7 eq. (8).

    Placed after scale_by_shape, u = s·O with s > 0, so u⊙P has the sign of O⊙P
    (the spec's mask) and the decay term itself is not shape-scaled. Needs params.
    With weight_decay == 0 it is the identity (like optax.add_decayed_weights).
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_cautious_decayed_weights needs params: call update(updates, state, params)")
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return updates, state
        # Decay only where update and weight agree in sign (exact zeros included).
        decayed = lambda u, p: u + jnp.where(u * p >= 0, weight_decay * p, 0.0)
        return jax.tree.map(decayed, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---- the optimizer -------------------------------------------------------------------


class MuonState(NamedTuple):
    """muon()'s state: one field per transform of the chain, in chain order."""

    orthogonalized_momentum: OrthogonalizedMomentumState
    normuon: NorMuonState | optax.EmptyState
    shape_scale: optax.EmptyState
    weight_decay: optax.EmptyState
    learning_rate: optax.ScaleByScheduleState

    @property
    def momentum(self) -> optax.Updates:
        return self.orthogonalized_momentum.momentum

    @property
    def second_moment(self) -> optax.Updates | None:
        return getattr(self.normuon, "second_moment", None)

    @property
    def count(self) -> jax.Array:
        return self.learning_rate.count


def _with_muon_state(chain: optax.GradientTransformation) -> optax.GradientTransformation:
    """`chain` with its tuple state named as a MuonState."""

    def init_fn(params):
        return MuonState(*chain.init(params))

    def update_fn(updates, state, params=None):
        updates, state = chain.update(updates, state, params)
        return updates, MuonState(*state)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    orthogonalizer: str | Callable[..., Any] = "newton_schulz",
    weight_decay: float = 0.0,
    cautious_weight_decay: bool = False,
    normuon_beta2: float | None = None,
    shape_scale: str = "max_ratio",
    ns_dtype=jnp.bfloat16,
    eps: float = 1e-7,
    nonfinite: str = "raise",
    orth_map: Callable[..., Any] = per_leaf,
    row_equilibration: bool = False,
    frobenius_renormalization: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Muon (.specs/muon_math.md §3–§7) as an optax transformation; `update` needs params.

    Args:
      learning_rate: float, or optax schedule evaluated at the number of steps
        taken (0 on the first step). A float is wrapped in a constant schedule,
        so the state always carries the step count.
      orthogonalizer, ns_steps, eps, ns_dtype: see resolve_orthogonalizer.
      shape_scale: "max_ratio" or "match_rms_adamw" (§6).
      nonfinite: "raise" or "skip" (§9, jax_reference.optim.nonfinite): under jit,
        "raise" needs checkify.checkify around the jitted update.
      orth_map: how orth reaches the matrices (scale_by_orthogonalized_momentum):
        per_leaf on one device; jax_reference.sharding.sharded builds the row-sharded step
        (§12) by passing its on_owners(mesh) here.
      row_equilibration: MuonEq (R), row_equilibrate on U before orth.
      frobenius_renormalization: Muon+ as nanochat, frobenius_renormalize on O after orth
        (before NorMuon). Both off by default (.specs/orthogonalizers.md §6; see `balanced`).

    Every leaf must have ndim >= 2 (ValueError naming the leaf otherwise).
    """
    orthogonalize = balanced(resolve_orthogonalizer(orthogonalizer, ns_steps, ns_dtype, eps),
                             row_equilibration, frobenius_renormalization)
    rule = shape_scale  # the argument shadows the module-level function of that name
    check_policy(nonfinite)
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    decay = add_cautious_decayed_weights if cautious_weight_decay else optax.add_decayed_weights
    chain = optax.chain(
        scale_by_orthogonalized_momentum(momentum, nesterov, orthogonalize, orth_map),
        optax.identity() if normuon_beta2 is None else scale_by_normuon(normuon_beta2),
        scale_by_shape(rule),
        decay(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    return guard_nonfinite(in_float32(_with_muon_state(chain)), nonfinite)


def sharded_muon(mesh, learning_rate, **muon_kwargs) -> optax.GradientTransformationExtraArgs:
    """`muon` on parameters row-sharded over `mesh` (.specs/muon_math.md §12; sharding/sharded.py):
    the same arguments, the same result as on one device."""
    return sharded(muon(learning_rate, orth_map=on_owners(mesh), **muon_kwargs), mesh)
