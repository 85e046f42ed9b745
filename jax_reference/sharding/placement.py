"""Which device orthogonalizes which matrix in the sharded Muon step (.specs/muon_math.md §12).

Parameters are sharded by rows over N devices (ZeRO-3 / FSDP, https://arxiv.org/abs/1910.02054):
with c = chunk_rows(rows, N) = max(1, ⌈rows/N⌉), device r holds rows [r·c, min((r+1)·c, rows)) of
each (possibly none). Newton-Schulz needs whole matrices, so every matrix of a same-shape stack of K
matrices gets one owner device, which orthogonalizes it. One NS run on a (rows, cols) matrix with
short side s and long side l costs

    ns_cost = steps · s²·(2l + s)      multiply-adds: X·Xᵀ s²·l, A·A s³, B·X s²·l per step

A device owns ⌊K/N⌋ or ⌈K/N⌉ matrices of each stack (so the packed buffers stay small). Stacks are
placed dearest-per-matrix first (ties: first seen first); each stack's K mod N extra matrices go one
each to the devices with the least cost so far (ties: lowest index). This is Graham's LPT rule
(R. L. Graham, "Bounds on multiprocessing timing anomalies", SIAM J. Appl. Math. 17, 1969) restricted
to count-balanced assignments; it keeps max load − min load ≤ the dearest matrix's cost, and no
device ever carries more than Σ ⌈K/N⌉·cost, which the plain count split puts on device 0.

Device r owns a contiguous run of its stack in stack order (device 0 the first counts[0] matrices,
then device 1, ...). In the packed buffer the stack is padded to chunk·N slots, chunk = max counts;
device r's matrices sit at slots [r·chunk, r·chunk + counts[r]) (StackLayout).
"""

import math
from dataclasses import dataclass


def chunk_rows(n_rows: int, n_devices: int) -> int:
    """Rows per device, c = max(1, ⌈n_rows/N⌉); the last devices may hold fewer, or none."""
    # max(1, ·): a shard of 0 rows would make the padded row axis c·N empty.
    return max(1, -(-n_rows // n_devices))


def ns_cost(shape, steps: int = 5) -> int:
    """Multiply-adds of `steps` Newton-Schulz steps on the (shape[0], prod(shape[1:])) view."""
    rows, cols = shape[0], math.prod(shape[1:])
    s, l = min(rows, cols), max(rows, cols)  # NS iterates on the transposed tall matrix: the Gram side is s
    return steps * s * s * (2 * l + s)


def owner_counts(stacks: list[tuple[int, int]], n_devices: int) -> list[list[int]]:
    """counts[i][r]: how many matrices of stack i = (K, cost per matrix) device r owns."""
    counts = [[K // n_devices] * n_devices for K, _ in stacks]
    load = [0] * n_devices
    # sorted() is stable, so equal costs keep their first-seen order.
    for i in sorted(range(len(stacks)), key=lambda i: -stacks[i][1]):
        K, cost = stacks[i]
        load = [x + (K // n_devices) * cost for x in load]
        # The base share adds the same to every device, so "least loaded" is unaffected by it.
        for r in sorted(range(n_devices), key=lambda r: (load[r], r))[: K % n_devices]:
            counts[i][r] += 1
            load[r] += cost
    return counts


@dataclass(frozen=True)
class StackLayout:
    """One stack's packed buffer: counts[r] matrices on device r, chunk = max(counts) slots each."""

    counts: tuple[int, ...]

    @property
    def n_devices(self) -> int:
        return len(self.counts)

    @property
    def chunk(self) -> int:
        return max(self.counts)

    @property
    def n_slots(self) -> int:
        return self.chunk * self.n_devices

    @property
    def starts(self) -> tuple[int, ...]:
        """Index in the stack of device r's first matrix (its run is [starts[r], starts[r] + counts[r]))."""
        return tuple(sum(self.counts[:r]) for r in range(self.n_devices))

    @property
    def owners(self) -> tuple[int, ...]:
        """owners[k]: the device that orthogonalizes matrix k of the stack."""
        return tuple(r for r, count in enumerate(self.counts) for _ in range(count))

    @property
    def slots(self) -> tuple[int, ...]:
        """slots[k]: where matrix k sits in the packed buffer of n_slots."""
        return tuple(r * self.chunk + j for r, count in enumerate(self.counts) for j in range(count))


def muon_layouts(shapes, n_devices: int, steps: int = 5) -> dict[tuple[int, ...], StackLayout]:
    """A StackLayout per distinct shape (a stack = all matrices of that shape, first seen first)."""
    sizes: dict[tuple[int, ...], int] = {}
    for shape in shapes:
        sizes[tuple(shape)] = sizes.get(tuple(shape), 0) + 1
    stacks = [(K, ns_cost(shape, steps)) for shape, K in sizes.items()]
    return {shape: StackLayout(tuple(c)) for shape, c in zip(sizes, owner_counts(stacks, n_devices))}
