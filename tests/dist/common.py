"""Data and tolerances shared by the distributed tests (importable inside spawned ranks).

Exactness. With the same gradient on every rank, AVG over ranks returns it unchanged only
if the fp32 sum of N copies is exact: gloo sums sequentially, and (x+x)+x can round (seen
at N=3: 1 ULP). Gradients drawn as bf16-representable values (8 significant bits) make
every partial sum k·x exact in fp32 (≤ 8 + log2(k) bits) and the division by N correctly
rounded back to x, for any N ≤ 2^15. So the "identical data" tests demand bit equality
with the single-device optimizers, and any difference is a real bug. (Batched NS on a
sub-stack is bit-identical to the full stack on this CPU: bmm works matrix by matrix.)

Tolerance for "different data per rank". gloo's AVG is a sequential fp32 sum divided by N;
the single process takes the fp32 mean of the same N gradients in another order. The two
means differ elementwise by at most ~N·u·max|g| (u = 2^-24), i.e. a relative input
perturbation of ε ≤ N^1.5·u in Frobenius norm for independent gradients (the mean shrinks
as 1/√N). Newton-Schulz amplifies an input perturbation by at most Π|a_k| (the derivative
of its polynomials at 0; 485 for NS5, parity_tests/tolerances.py), the same factor that
bounds its own rounding, so the orthogonalized update differs by ≤ (2 + N^1.5)·u·Π|a_k|
relative Frobenius; with ‖O‖_F ≈ √min(rows, cols) that bounds each element of the
parameter change by lr·scale·√min(rows, cols) times that, per step (momentum carries the
earlier steps' differences, so the bound adds up over steps). Momentum itself never passes
through NS: it differs by the mean's rounding only, a few ULPs of max|g| per step.
"""

from __future__ import annotations

import math

import torch

from torch_impl.optim.muon import as_matrix_shape, shape_scale
from torch_impl.orthogonalizers.newton_schulz import NS5_COEFFS, POLAR_EXPRESS_COEFFS, coefficient_schedule

U = 2.0**-24


def seeded(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (2**62))


def exact_randn(shape, *key: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian values rounded to bf16 (exactly averaged over ranks, see the docstring)."""
    return torch.randn(shape, generator=seeded(*key)).bfloat16().to(dtype)


def make_params(specs, seed: int = 0) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(exact_randn(shape, seed, i, dtype=dtype)) for i, (shape, dtype) in enumerate(specs)]


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def amplification(orthogonalizer: str) -> float:
    coeffs = NS5_COEFFS if orthogonalizer == "newton_schulz" else POLAR_EXPRESS_COEFFS
    return math.prod(abs(a) for a, _, _ in coefficient_schedule(coeffs, 5))


def mean_grad_param_tolerance(shape, n: int, steps: int, lr: float, rule: str = "max_ratio",
                              orthogonalizer: str = "newton_schulz", normuon: bool = False) -> float:
    """Elementwise bound on |DistMuon − Muon(mean gradient)| after `steps` (module docstring);
    NorMuon's rescaling by 1/√v can amplify by up to ~3 more (as in the parity tests)."""
    rows, cols = as_matrix_shape(shape)
    rel = (2 + n**1.5) * U * amplification(orthogonalizer)
    per_step = lr * shape_scale(rows, cols, rule) * math.sqrt(min(rows, cols)) * rel
    return steps * per_step * (3 if normuon else 1) + 8 * U * 4 * steps


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> tuple[bool, float]:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return err <= atol, err


def step_identical(params, ref, opt, ref_opt, steps, seed=1):
    """`steps` steps of a distributed and a reference optimizer on identical exact gradients."""
    for t in range(steps):
        for i, (p, q) in enumerate(zip(params, ref)):
            g = exact_randn(p.shape, seed, t, i, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
