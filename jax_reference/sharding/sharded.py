"""Muon/AdamW on parameters sharded by rows over a 1-D Mesh (.specs/muon_math.md §12).

Layout (ZeRO-3 / FSDP, https://arxiv.org/abs/1910.02054). Every array with ndim ≥ 1 (parameter,
gradient, optimizer state) is split on dim 0 over the N devices of the mesh axis "x": with
c = chunk_rows(rows, N), device r holds rows [r·c, min((r+1)·c, rows)), possibly none. A jax.Array
must divide evenly over its mesh, so the stored array is zero-padded on dim 0 to c·N rows and kept
with its logical row count as a RowSharded pytree node; unshard_rows gives the logical (unpadded)
values. 0-d arrays (step counts) are replicated.

The step. `sharded(tx, mesh)` runs any optax transformation on the logical arrays and stores its
outputs row-sharded again. Under jit the slicing and re-padding are local (XLA's tiling of the
logical array is the same c rows per device), and every reduction of the inner step (NorMuon's row
means and Frobenius norms, §5) is a reduction over the logical array, so it is global: XLA adds the
all-reduce, no shard ever normalizes by its own statistics. Everything elementwise (momentum,
Nesterov, shape scale, weight decay, lr, AdamW) stays on the rows a device holds.

Only orth (§4) needs whole matrices. `on_owners(mesh)` is Muon's orth_map for this layout: for each
stack of K same-shape matrices, placement.muon_layouts gives every matrix an owner device; one
all_to_all turns the row shards of the packed stack (chunk·N slots) into whole matrices on their
owners, the owner runs the unchanged orthogonalizer on each, and one all_to_all sends the rows of the
result back. So the sharded step computes what the single-device step computes (MaxText moves the
sharding onto the stack axis the same way: src/maxtext/optimizers/muon.py).

Usage: stored = shard_rows(params, mesh); tx = optim.muon.sharded_muon(mesh, lr, ...) or, for the nanochat
hybrid, tx = sharded(hybrid(params, orth_map=on_owners(mesh), ...), mesh); then jax.jit(tx.update)
and optax.apply_updates on the stored trees as usual. A loss takes unshard_rows(stored), so its
gradient w.r.t. stored comes back in the stored layout.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_reference.sharding.placement import StackLayout, chunk_rows, muon_layouts

AXIS = "x"


def row_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D Mesh named AXIS over the first n_devices devices (all by default)."""
    devices = jax.devices()
    n_devices = len(devices) if n_devices is None else n_devices
    if n_devices > len(devices):
        raise ValueError(f"asked for {n_devices} devices, JAX sees {len(devices)} (on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count=N before jax is imported)")
    # Not jax.make_mesh: its axes default to Explicit (sharding in types), under which slicing the
    # padded rows away needs an explicit out_sharding; the step relies on XLA propagating it (Auto).
    return Mesh(np.array(devices[:n_devices]), (AXIS,))


def check_mesh(mesh: Mesh) -> int:
    """N, the device count of a 1-D Mesh whose only axis is AXIS of type Auto (ValueError otherwise)."""
    if mesh.axis_names != (AXIS,) or tuple(mesh.axis_types) != (AxisType.Auto,):
        raise ValueError(f"need a 1-D Mesh with the Auto axis {AXIS!r} (row_mesh(n) makes one), got {mesh}")
    return mesh.shape[AXIS]


# ---- the stored layout ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSharded:
    """A logical (rows, ...) array stored as `data`: dim 0 zero-padded to c·N, sharded on AXIS."""

    data: jax.Array
    rows: int = field(metadata=dict(static=True))

    @property
    def value(self) -> jax.Array:
        return self.data[: self.rows]


def _is_row_sharded(x) -> bool:
    return isinstance(x, RowSharded)


def _place(x, sharding: NamedSharding):
    # Under tracing, a constraint on the output layout; eagerly, the transfer.
    if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x, sharding)
    return jax.device_put(x, sharding)


def shard_rows(tree, mesh: Mesh):
    """Each array of `tree` row-sharded on `mesh` (RowSharded); 0-d arrays replicated."""
    n = check_mesh(mesh)

    def shard(x):
        x = jnp.asarray(x)
        if x.ndim == 0:
            return _place(x, NamedSharding(mesh, P()))
        pad = chunk_rows(x.shape[0], n) * n - x.shape[0]
        padded = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return RowSharded(_place(padded, NamedSharding(mesh, P(AXIS))), x.shape[0])

    return jax.tree.map(shard, tree)


def unshard_rows(tree):
    """The logical arrays of a tree of RowSharded (other leaves unchanged); a local slice under jit."""
    return jax.tree.map(lambda x: x.value if _is_row_sharded(x) else x, tree, is_leaf=_is_row_sharded)


def sharded(tx: optax.GradientTransformation, mesh: Mesh) -> optax.GradientTransformationExtraArgs:
    """`tx` on row-sharded trees: params, updates and state are stored by shard_rows.

    The inner transformation sees logical arrays and never knows about the layout, so its math is
    the single-device math (give Muon orth_map=on_owners(mesh) so orth sees whole matrices without
    gathering them everywhere). Jit the update: eagerly each slice would gather the whole array.
    """
    check_mesh(mesh)
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        return shard_rows(tx.init(unshard_rows(params)), mesh)

    def update_fn(updates, state, params=None, **extra_args):
        new, state = tx.update(unshard_rows(updates), unshard_rows(state), unshard_rows(params), **extra_args)
        return shard_rows(new, mesh), shard_rows(state, mesh)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---- orth on owners (§12) ---------------------------------------------------------------------------


def _orthogonalize_stack(orthogonalize: Callable, stack: jax.Array, layout: StackLayout, mesh: Mesh) -> jax.Array:
    """orth of each matrix of a (K, rows, cols) stack, row-sharded in and out, computed on its owner."""
    K, rows, cols = stack.shape
    n, chunk = layout.n_devices, layout.chunk
    c = chunk_rows(rows, n)
    counts, starts = layout.counts, layout.starts
    padded = jnp.pad(stack, ((0, 0), (0, c * n - rows), (0, 0)))  # shard_map needs c·N rows

    def owned(j, X):
        # A device owning fewer than chunk matrices skips its empty slots (zeros, dropped below).
        if j < min(counts):
            return orthogonalize(X).astype(X.dtype)
        mine = jnp.asarray(counts)[jax.lax.axis_index(AXIS)]
        return jax.lax.cond(j < mine, lambda X: orthogonalize(X).astype(X.dtype), jnp.zeros_like, X)

    def on_device(local):  # (K, c, cols): this device's rows of every matrix
        empty = lambda m: jnp.zeros((m, c, cols), local.dtype)
        packed = jnp.concatenate(
            [part for r in range(n) for part in (local[starts[r] : starts[r] + counts[r]], empty(chunk - counts[r]))]
        )  # (chunk·N, c, cols): device r's matrices at slots [r·chunk, r·chunk + counts[r])
        # Slots [r·chunk, (r+1)·chunk) go to device r; the row blocks arrive in device order, so
        # concatenating them on the row axis rebuilds whole matrices (plus the padding rows).
        whole = jax.lax.all_to_all(packed, AXIS, split_axis=0, concat_axis=1, tiled=True)[:, :rows]
        # One call per matrix, as per_leaf on one device: orth (§4) maps a (rows, cols) matrix, and the
        # same call on the same matrix is what makes the bf16-NS step bitwise equal to one device's.
        O = jnp.stack([owned(j, whole[j]) for j in range(chunk)])
        O = jnp.pad(O, ((0, 0), (0, c * n - rows), (0, 0)))
        back = jax.lax.all_to_all(O, AXIS, split_axis=1, concat_axis=0, tiled=True)  # (chunk·N, c, cols)
        return jnp.concatenate([back[r * chunk : r * chunk + counts[r]] for r in range(n)])

    out = jax.shard_map(on_device, mesh=mesh, in_specs=P(None, AXIS), out_specs=P(None, AXIS))(padded)
    return out[:, :rows]


def on_owners(mesh: Mesh) -> Callable:
    """Muon's orth_map for row-sharded matrices: each same-shape stack orthogonalized on its owners."""
    n = check_mesh(mesh)

    def orth_map(orthogonalize: Callable, matrices):
        leaves, treedef = jax.tree.flatten(matrices)
        shapes = [tuple(m.shape) for m in leaves]
        out = [None] * len(leaves)
        # ns_steps scales every stack's cost alike, so the default steps gives the same owners.
        for shape, layout in muon_layouts(shapes, n).items():
            members = [i for i, s in enumerate(shapes) if s == shape]
            O = _orthogonalize_stack(orthogonalize, jnp.stack([leaves[i] for i in members]), layout, mesh)
            for k, i in enumerate(members):
                out[i] = O[k]
        return jax.tree.unflatten(treedef, out)

    return orth_map
