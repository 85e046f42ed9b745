"""The gradient reduce_scatters of a sharded optimizer: what a bucket is, how its gradients are
packed, and when it is launched (at the step, or during the last micro-batch's backward).

ZeRO-2 as its name promises: gradients are reduce_scattered during the last micro-batch's
backward, and each full gradient is dropped as soon as its bucket is on the wire.

    for micro_batch in batches[:-1]:
        loss(micro_batch).backward()          # accumulate as usual
    loss = loss(batches[-1])
    with opt.reduce_in_backward(loss):
        loss.backward()                       # each bucket's reduce_scatter starts here
    opt.step()

Without it every rank holds the full gradient of every parameter until the step (nanochat's
"ZeRO-2" does: ZeRO-1 memory for gradients). ZeRO stage 2 (Rajbhandari et al.,
https://arxiv.org/abs/1910.02054) keeps only each rank's 1/N of the reduced gradient.

A `Bucket` is the parameters one reduce_scatter reduces and the packing of their gradients into
its send buffer, read from the placement: a Muon stack (`stack_bucket`: rank r's matrices at
[r·chunk, r·chunk + count_r) of a (chunk·N, rows, cols) buffer) or an AdamW row-sharded
parameter (`rows_bucket`: the gradient zero-padded to chunk·N rows). An optimizer builds its
buckets once, when it places its parameters, and hands them to its `GradientReducer`. It then
only asks: `reduction(b)` gives bucket b's launched reduce_scatter (launched in backward, or now);
the reducer never calls back into the optimizer.

In backward, a post-accumulate-grad hook on every parameter of a bucket records whether the
gradient is finite on this rank and, once the bucket's last gradient has been accumulated,
launches the bucket's reduce_scatter (the very launch the step uses when no hook ran) and sets
the full gradients to None. At most `IN_FLIGHT` buckets per optimizer are unfinished: launching
one more waits for the oldest and drops its send buffer, so the peak holds the gradients not yet
reduced plus two buckets, and the reductions overlap the rest of the backward; when backward
returns, each rank holds its 1/N of the reduced gradients (and the small replicated ones). Small
replicated parameters (AdamW's gains and scalars) keep their gradients and are all_reduced at
the step as before.

Collectives launched from hooks must be the same, in the same order, on every rank. So before
backward `reducing_in_backward` reads from `loss`'s autograd graph which parameters will get a
gradient (its AccumulateGrad nodes) and checks with one any_rank that every rank agrees (else a
ValueError on every rank, before anything is launched), and buckets are launched in one fixed
order (the reverse of the parameter order, which is about the order backward produces them; a
bucket completed early waits for its predecessors). Whatever is still unlaunched when backward
returns is launched on leaving the context.

The step then finds those buckets launched and goes on as usual. Its collective check (phase 1)
counts a dropped gradient as present and uses the finite flag recorded before it was dropped,
so the non-finite policy behaves exactly as without hooks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from torch_impl.sharding.checks import grad_flags
from torch_impl.sharding.comm import Comm
from torch_impl.sharding.placement import Rows, StackLayout, matrix_shape

IN_FLIGHT = 2  # buckets whose reduce_scatter may be unfinished while backward goes on


@dataclass
class Reduction:
    """A launched reduce_scatter: `recv` holds this rank's chunk once `work` is done; `send`
    stays referenced until then (a freed input could be reused before the collective reads
    it)."""
    send: torch.Tensor | None
    recv: torch.Tensor
    work: object

    def wait(self) -> torch.Tensor:
        if self.send is not None:
            self.work.wait()
            self.send = None
        return self.recv


@dataclass(frozen=True)
class Bucket:
    """The parameters one reduce_scatter reduces, and `pack()`: their gradients in the send
    buffer (dim 0 = N chunks, rank r's chunk being what it receives)."""
    params: tuple[torch.Tensor, ...]
    pack: Callable[[], torch.Tensor]


def stack_bucket(layout: StackLayout, dtype: torch.dtype, world_size: int) -> Bucket:
    """A Muon stack: its gradients packed by its layout (rank r's matrices at [r·chunk, r·chunk +
    count_r), zeros elsewhere), so rank r receives the averaged gradients of its own matrices."""
    def pack() -> torch.Tensor:
        rows, cols = matrix_shape(layout.params[0].shape)
        send = torch.zeros(layout.chunk * world_size, rows, cols, dtype=dtype, device=layout.params[0].device)
        for p, slot in zip(layout.params, layout.slots):
            if p.grad is not None:
                send[slot].copy_(p.grad.reshape(rows, cols))
        return send
    return Bucket(layout.params, pack)


def rows_bucket(p: torch.Tensor, place: Rows, dtype: torch.dtype, world_size: int) -> Bucket:
    """An AdamW row-sharded parameter: its gradient zero-padded to chunk·N rows, so rank r
    receives the averaged rows local_rows(r)."""
    def pack() -> torch.Tensor:
        send = torch.zeros(place.chunk * world_size, *p.shape[1:], dtype=dtype, device=p.device)
        send[:p.shape[0]].copy_(p.grad)
        return send
    return Bucket((p,), pack)


def graph_params(loss: torch.Tensor) -> set[torch.Tensor]:
    """The leaf tensors that `loss.backward()` will accumulate a gradient into: the variables
    of the AccumulateGrad nodes reachable from loss.grad_fn."""
    found, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(fn.variable)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


class GradientReducer:
    """One optimizer's buckets: launched at the step (`reduction`), or in backward by hooks
    (`arm` ... `disarm`, through `reducing_in_backward`)."""

    def __init__(self, comm: Comm, buckets: list[Bucket] = ()):
        self.comm = comm
        self.buckets = list(buckets)
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket.params}
        self.armed = False
        self.hooks = None
        self.early: dict[int, Reduction] = {}             # bucket index -> its launched reduction
        self.flags: dict[torch.Tensor, torch.Tensor] = {}  # dropped gradient -> "non-finite here"
        self.in_flight: deque[Reduction] = deque()

    def launch(self, b: int) -> Reduction:
        """Pack bucket b's gradients and launch its reduce_scatter (none at one rank)."""
        send = self.buckets[b].pack()
        recv, work = self.comm.reduce_scatter_chunks(send)  # N = 1: `send` itself, no collective
        return Reduction(send, recv, work)

    def reduction(self, b: int) -> Reduction:
        """Bucket b's reduction: the one launched in backward, else launched now."""
        return self.early.pop(b, None) or self.launch(b)

    def has_grad(self, p: torch.Tensor) -> bool:
        """p has a gradient this step (possibly already reduced and dropped in backward)."""
        return p.grad is not None or p in self.flags

    # -- in backward ------------------------------------------------------------------------

    def install(self) -> None:
        if self.hooks is None:
            self.hooks = [p.register_post_accumulate_grad_hook(self.hook) for p in self.bucket_of if p.requires_grad]

    def arm(self, will_have_grad: set[torch.Tensor]) -> None:
        """Before backward: which bucket parameters this backward fills, the launch order. At one
        rank nothing is launched early (there is nothing to overlap, and no gradient to drop)."""
        if self.comm.world_size == 1:
            self.order, self.next = [], 0
            return
        self.install()
        self.waiting = [sum(1 for p in bucket.params if p in will_have_grad) for bucket in self.buckets]
        # fixed order, the same on every rank: buckets that will hold a gradient (a filled one,
        # or one accumulated by earlier micro-batches), last parameter first
        self.order = [b for b in reversed(range(len(self.buckets)))
                      if self.waiting[b] or any(p.grad is not None for p in self.buckets[b].params)]
        self.next = 0
        self.armed = True

    @torch.no_grad()
    def hook(self, p: torch.Tensor) -> None:
        if not self.armed or p not in self.bucket_of:
            return
        self.waiting[self.bucket_of[p]] -= 1
        self.launch_ready()

    def launch_ready(self) -> None:
        """Launch the complete buckets at the head of the order."""
        while self.next < len(self.order) and self.waiting[self.order[self.next]] <= 0:
            b = self.order[self.next]
            self.next += 1
            params = self.buckets[b].params
            for q in params:
                if q.grad is not None:
                    self.flags[q] = ~torch.isfinite(q.grad).all()
            # planted-bug target (parity_tests/mutants.py)
            reduction = self.launch(b)
            self.early[b] = reduction
            for q in params:
                # planted-bug target (parity_tests/mutants.py)
                q.grad = None
            self.in_flight.append(reduction)
            while len(self.in_flight) > IN_FLIGHT:
                self.in_flight.popleft().wait()

    def disarm(self) -> None:
        """After backward: everything is complete, launch what is left in order, then wait for
        the reductions still in flight and drop their send buffers (the step would wait for
        them first thing anyway), so only the received 1/N shards remain."""
        self.armed = False
        for b in self.order[self.next:]:
            self.waiting[b] = 0
        with torch.no_grad():
            self.launch_ready()
        while self.in_flight:
            self.in_flight.popleft().wait()

    # -- after the step ---------------------------------------------------------------------

    def clear(self) -> None:
        """Forget this step's early reductions (after the step, a skipped step, zero_grad),
        waiting for any still unfinished so their buffers are not reused under them."""
        for reduction in self.early.values():
            reduction.wait()
        self.early.clear()
        self.flags.clear()
        self.in_flight.clear()

    @contextmanager
    def consumed(self):
        """Around a step: afterwards this step's early reductions are forgotten; if the step
        raised, they are waited for first (every rank launched the same ones, so they finish)."""
        try:
            yield
        finally:
            self.clear()


@contextmanager
def reducing_in_backward(reducers: list[GradientReducer], loss: torch.Tensor, comm: Comm,
                         param_groups: list[dict]):
    """Around the last micro-batch's `loss.backward()`, for the `reducers` of optimizers sharing
    `comm`: one collective presence check over `param_groups` (a gradient on some ranks only
    raises on every rank, before any launch), then every reducer armed."""
    will_have_grad = graph_params(loss)
    if comm.world_size > 1:
        present = {p: None for g in param_groups for p in g["params"] if p in will_have_grad}
        grad_flags(comm, param_groups, check_finite=False, reduced=present)
    for reducer in reducers:
        reducer.arm(will_have_grad)
    try:
        yield
    except BaseException:
        for reducer in reducers:  # a failed backward launches nothing more
            reducer.armed = False
        raise
    for reducer in reducers:
        reducer.disarm()
