"""The optimizers: one class per kind for every world size, and the nanochat hybrid of the two.

    from torch_impl.optim import Muon, AdamW, hybrid

Each kind's math and class live in one file (muon.py, adamw.py); what they share is base.py,
the split and the pair is hybrid.py, the non-finite gradient policy nonfinite.py. Code inside
torch_impl imports from those modules, never from this face (the layering test reads imports).
"""

from torch_impl.optim.adamw import AdamW, DistAdamW
from torch_impl.optim.hybrid import HybridOptimizer, hybrid
from torch_impl.optim.muon import DistMuon, Muon

__all__ = ["AdamW", "DistAdamW", "DistMuon", "HybridOptimizer", "Muon", "hybrid"]
