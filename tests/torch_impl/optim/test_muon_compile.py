"""Muon(compile=True): the orthogonalizer (with MuonEq / Muon+) through torch.compile, against eager.

The suite runs with TORCHDYNAMO_DISABLE=1 (conftest.py), which would turn torch.compile into a
no-op and this comparison into eager vs eager: the test switches dynamo back on and checks that
a graph was really compiled. A cold inductor compile costs ~15-20 s on 2 CPU cores, so one
stack shape only."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo  # noqa: F401  (counters, reset)
from torch._dynamo.utils import counters

from tests.rounding_bounds import FP32_U, ns_condition, tolerance
from torch_impl.optim import Muon, hybrid
from torch_impl.optim.muon import shape_scale
from torch_impl.orthogonalizers.newton_schulz import POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_NORM_SCALE


def run(compile: bool, device: str, ns_dtype: torch.dtype, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 48, generator=gen).to(device)) for _ in range(2)]
    opt = Muon(params, lr=0.05, orthogonalizer="polar_express", ns_dtype=ns_dtype, weight_decay=0.1,
               normuon_beta2=0.95, row_equilibration=True, frobenius_renormalization=True, compile=compile)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_orthogonalizer_matches_eager(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # read when torch.compile is called
    torch._dynamo.reset()
    counters.clear()
    ns_dtype = torch.float32
    eager = run(False, device, ns_dtype)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = run(True, device, ns_dtype)
    assert counters["stats"]["unique_graphs"] == 1  # one stack shape, one graph, no recompiles
    # Inductor fuses and reorders the fp32 ops: each O is within 2·u·κ_PE of the exact result, so
    # the two are within 2× that, relative. Muon+ and NorMuon are smooth rescalings (×3 each, as
    # parity_tests/test_muon_parity.py); per step ‖ΔP‖_F ≤ lr·scale·that·‖O‖_F, ‖O‖_F = √16 after
    # Muon+ (NorMuon keeps it). 3 steps, plus 8 ULPs of |p| ≤ 5 per step for the elementwise rest.
    # Measured on a 2-core CPU: 1.1e-6 and 1.3e-6 against the bound 1.5e-3.
    kappa = ns_condition(POLAR_EXPRESS_COEFFS, 1 / POLAR_EXPRESS_NORM_SCALE)
    per_step = 0.05 * shape_scale(16, 48, "max_ratio") * 2 * tolerance(FP32_U, kappa) * 9 * math.sqrt(16)
    bound = 3 * (per_step + 8 * FP32_U * 5 * math.sqrt(16 * 48))
    # Teeth: one step moves P by lr·‖O‖_F = 0.2; a wrong graph (an option dropped, a coefficient
    # changed) moves it by O(0.01-0.2), above the bound (1.5e-3).
    assert bound < 1e-2
    for e, c in zip(eager, compiled):
        assert (e - c).norm() <= bound, (e - c).norm()


def test_hybrid_passes_compile_to_muon():
    model = torch.nn.Linear(8, 8)
    named = [("transformer.h.0.attn.c_q.weight", model.weight)]
    assert hybrid(named, compile=True).optimizers["muon"].compile is True
    assert hybrid(named).optimizers["muon"].compile is False
