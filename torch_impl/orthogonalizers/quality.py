"""How good an approximate polar factor is: the metrics of .specs/orthogonalizers.md §7, in float64.

For G (m × n) = U Σ Vᵀ (thin SVD), s = min(m, n), and an approximation O of the polar factor U Vᵀ.
In the wide orientation (W = G, P = O if m ≤ n, else W = Gᵀ, P = Oᵀ; s × l), H = (W Pᵀ + P Wᵀ)/2
is the symmetric factor of W ≈ H P ((W Wᵀ)^½ ⪰ 0 for the exact P):

    orth_error       ‖P Pᵀ − I_s‖_F / √s
    polar_error      ‖O − U Vᵀ‖_F / √s       (meaningful when G has full rank s)
    sigma_min/max    smallest / largest singular value of O
    residual_error   ‖H P − W‖_F / ‖G‖_F
    psd_error        ‖λ₋(H)‖₂ / ‖λ₊(H)‖₂
    dual_obj         (‖G‖_* − ⟨G, O⟩) / ‖G‖_*
    bound_violation  max(σ_max(O) − 1, 0)

The last four are the stress-test metrics of Dao-AILab/gram-newton-schulz (tests/stress_test.py).
A non-finite O gives inf for every metric; a zero G gives nan residual_error and dual_obj.
"""

from __future__ import annotations

import math

import torch

from torch_impl.orthogonalizers.newton_schulz import _check_matrix_input, wide

METRICS = ("orth_error", "polar_error", "sigma_min", "sigma_max", "residual_error", "psd_error", "dual_obj",
           "bound_violation")


def _fro(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum(dim=(-2, -1)).sqrt()


def quality_metrics(O: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """The METRICS of O as an approximate polar factor of G: float64 tensors of G's batch shape.
    ValueError for mismatched shapes and for the inputs newton_schulz rejects in G."""
    _check_matrix_input(G, check_finite=True)
    if O.shape != G.shape:
        raise ValueError(f"O and G must have the same shape, got {tuple(O.shape)} and {tuple(G.shape)}")
    batch = G.shape[:-2]
    G, O = G.detach().to(torch.float64), O.detach().to(G.device, torch.float64)
    if not bool(torch.isfinite(O).all()):
        return {name: torch.full(batch, math.inf, dtype=torch.float64, device=G.device) for name in METRICS}
    s = min(G.shape[-2:])
    W, P = wide(G), wide(O)  # (B, s, l)
    U, sig_g, Vh = torch.linalg.svd(G, full_matrices=False)
    sig_o = torch.linalg.svdvals(O)
    H = W @ P.mT
    H = (H + H.mT) / 2
    lam = torch.linalg.eigvalsh(H)
    neg = lam.clamp_max(0).square().sum(-1).sqrt()
    pos = lam.clamp_min(0).square().sum(-1).sqrt()
    nuclear = sig_g.sum(-1)
    eye = torch.eye(s, dtype=torch.float64, device=G.device)
    out = {
        "orth_error": _fro(P @ P.mT - eye) / math.sqrt(s),
        "polar_error": _fro(O - U @ Vh) / math.sqrt(s),
        "sigma_min": sig_o.amin(-1),
        "sigma_max": sig_o.amax(-1),
        "residual_error": _fro(H @ P - W).reshape(batch) / _fro(G),
        "psd_error": torch.where(neg == 0, 0.0, neg / pos),
        "dual_obj": (nuclear - (G * O).sum(dim=(-2, -1))) / nuclear,
        "bound_violation": (sig_o.amax(-1) - 1).clamp_min(0),
    }
    return {k: v.reshape(batch) for k, v in out.items()}
