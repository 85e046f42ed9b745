"""One stack of FSDP2 DTensor matrices moved between the layout they are stored in (every rank
holds its rows of every matrix) and the layout a whole-matrix computation needs (each matrix
whole on its owner), and back: the layout of torchtitan's and MaxText's sharded Muon.

    relayout = RowsToOwners(layout, comm)     # launches: my rows of every gradient -> owners
    owned, G = relayout.owned_gradients()     # waits: the owned matrices' whole gradients
    relayout.send_back(f(owned, G))           # launches: each rank its rows of the results
    rows, D = relayout.local_results()        # waits: my rows of the results, my parameter rows

Each direction is ONE packed all_to_all, moving (N−1)/N of the active matrices' bytes per rank on
average, the pair about one all_reduce (2·(N−1)/N). What runs on the owner (Muon's
`muon_direction`) and what every rank does with its rows (`apply_direction`) is the caller's
math; this module only moves rows, so the result is the single-device math's, bit for bit.

The stack is in owner order (each owner a contiguous run, StackLayout), so each buffer is the
concatenation of per-rank pieces in rank order and the received results come back in stack
order. Matrices without a gradient this step take no part (presence is the same on every rank).
"""

from __future__ import annotations

import torch

from torch_impl.sharding.comm import Comm
from torch_impl.sharding.placement import Rows, StackLayout, matrix_shape


class RowsToOwners:
    def __init__(self, layout: StackLayout, comm: Comm):
        self.layout, self.comm = layout, comm
        n, rank = comm.world_size, comm.rank
        self.active = [p for p in layout.params if p.grad is not None]
        self.rows, self.cols = matrix_shape(layout.params[0].shape)
        self.bounds = [Rows(self.rows, layout.row_chunk).local_rows(r) for r in range(n)]
        owner_of = dict(zip(layout.params, layout.owners()))
        self.counts = [0] * n
        for p in self.active:
            self.counts[owner_of[p]] += 1
        self.owned = [p for p in self.active if owner_of[p] == rank]
        row_elems = [(end - start) * self.cols for start, end in self.bounds]
        # gradients to the owners: my rows of each matrix, grouped by owner (= stack order)
        send = torch.cat([p.grad.to_local().reshape(-1) for p in self.active])
        self.grad_splits = ([c * row_elems[rank] for c in self.counts],
                            [len(self.owned) * e for e in row_elems])
        self.grads, self.work = comm.all_to_all(send, *self.grad_splits, kind="all_to_all_grads")
        self.send = send  # referenced until the wait (a freed input could be reused before it is read)

    def owned_gradients(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Wait for the gradients; (the matrices this rank owns, their whole fp32 gradients
        stacked as (k, rows, cols))."""
        self.work.wait()
        k = len(self.owned)
        G = torch.empty(k, self.rows, self.cols, dtype=torch.float32, device=self.grads.device)
        _, received = self.grad_splits
        for (start, end), piece in zip(self.bounds, self.grads.split(received)):
            G[:, start:end].copy_(piece.view(k, end - start, self.cols))
        return self.owned, G

    def send_back(self, results: torch.Tensor | None) -> None:
        """Launch the return of the owned matrices' fp32 `results` (k, rows, cols), each rank
        its rows: the reverse of the gradients' splits. None when this rank owns nothing."""
        if results is not None:
            # planted-bug target (parity_tests/mutants.py)
            send = torch.cat([results[:, start:end].reshape(-1) for start, end in self.bounds])
        else:
            send = torch.empty(0, dtype=torch.float32, device=self.grads.device)
        self.send = send
        sent, received = self.grad_splits
        self.results, self.work = self.comm.all_to_all(send, received, sent, kind="all_to_all_directions")

    def local_results(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Wait for this rank's rows of every result; (this rank's local rows of the active
        parameters, their rows of the results as (k, local rows, cols)); ([], None) when this
        rank holds no rows."""
        self.work.wait()
        start, end = self.bounds[self.comm.rank]
        if end == start:
            return [], None
        local = [p.to_local() for p in self.active]
        return local, self.results.view(len(local), end - start, self.cols)
