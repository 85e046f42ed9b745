"""Counting the collectives that DTensor code runs (benchmarks only): `DTensorTraffic`."""

from __future__ import annotations

from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from torch_impl.sharding.comm import CommStats


class DTensorTraffic(TorchDispatchMode):
    """Counts the collectives that DTensor code runs inside `with DTensorTraffic(n) as t:` into
    `t.stats`, a CommStats with the same ring-model bytes as Comm's counters, so an outside
    optimizer on DTensors (torch.optim.Muon on FSDP2 parameters) can be compared byte for byte
    with ours. It lets DTensor desugar first (as torch's CommDebugMode does) and then sees the
    functional collectives on local tensors; `n` is the group size."""

    _RING = {"all_gather_into_tensor": lambda n: n - 1,        # × input bytes
             "reduce_scatter_tensor": lambda n: (n - 1) / n,   # × input bytes
             "all_reduce": lambda n: 2 * (n - 1) / n,
             "all_to_all_single": lambda n: (n - 1) / n}

    def __init__(self, world_size: int):
        super().__init__()
        self.n = world_size
        self.stats = CommStats()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        packet = getattr(func, "_overloadpacket", None)
        kind = packet._qualified_op_name.split("::")[-1] if packet is not None else ""
        if "c10d_functional" in getattr(packet, "_qualified_op_name", "") and kind in self._RING:
            size = args[0].numel() * args[0].element_size()
            self.stats.add(kind, size, self._RING[kind](self.n) * size)
        return out
