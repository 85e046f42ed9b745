"""How good an approximate polar factor is: the metrics of .specs/orthogonalizers.md §7, numpy fp64.

For G (m × n) with thin SVD G = U Σ Vᵀ, s = min(m, n), and an approximation O of the polar factor
U Vᵀ (same shape). Like the orthogonalizers, the metrics work in the wide orientation: W = G, P = O
when m ≤ n, else W = Gᵀ, P = Oᵀ (s × l). H = (W Pᵀ + P Wᵀ)/2 (s × s) is the symmetric factor of
W ≈ H P (for P = exact: H = (W Wᵀ)^½, positive semidefinite). For tall G this is G ≈ O H with
H = (OᵀG + GᵀO)/2, stress_test's definition.

    orth_error       ‖P Pᵀ − I_s‖_F / √s  (the small side's Gram: O Oᵀ when wide, OᵀO when tall)
    polar_error      ‖O − U Vᵀ‖_F / √s   (U Vᵀ = exact_polar(G); meaningful when G has full rank s)
    sigma_min        smallest of the s singular values of O
    sigma_max        largest singular value of O (= ‖O‖₂)
    residual_error   ‖H P − W‖_F / ‖G‖_F
    psd_error        ‖λ₋(H)‖₂ / ‖λ₊(H)‖₂: the negative eigenvalues of H against the positive ones
                     (0 for the exact polar factor; inf when H ⪯ 0, H ≠ 0)
    dual_obj         (‖G‖_* − ⟨G, O⟩) / ‖G‖_*: the nuclear-norm duality gap (0 at O = U Vᵀ)
    bound_violation  max(σ_max(O) − 1, 0)

The last four are Dao-AILab/gram-newton-schulz tests/stress_test.py's polar_accuracy_metrics (which
uses tall matrices; its orth_error uses O Oᵀ with O's row count, equal to ours for wide O). A
non-finite O gives inf for every metric, as there; a zero G gives nan residual_error and dual_obj.

Public names: METRICS, quality_metrics.
"""

import numpy as np

from jax_reference.orthogonalizers.newton_schulz import _check_matrix

METRICS = ("orth_error", "polar_error", "sigma_min", "sigma_max", "residual_error", "psd_error", "dual_obj",
           "bound_violation")


def _norm(x, axis):
    return np.sqrt(np.sum(np.square(x), axis=axis))


def quality_metrics(O, G) -> dict[str, np.ndarray]:
    """The METRICS of O as an approximate polar factor of G, each a float64 array of G's batch shape.

    O and G: concrete arrays of one shape (..., m, n); any floating dtype (upcast to float64).
    ValueError for mismatched shapes and the inputs newton_schulz rejects in G.
    """
    G = G if isinstance(G, np.ndarray) else np.asarray(G)
    O = O if isinstance(O, np.ndarray) else np.asarray(O)
    _check_matrix(G.dtype, G.shape, G)
    if O.shape != G.shape:
        raise ValueError(f"O and G must have the same shape, got {O.shape} and {G.shape}")
    batch = G.shape[:-2]
    if not np.all(np.isfinite(O.astype(np.float64))):
        return {name: np.full(batch, np.inf) for name in METRICS}
    G, O = G.astype(np.float64), O.astype(np.float64)
    m, n = G.shape[-2:]
    s = min(m, n)
    T = lambda x: np.swapaxes(x, -1, -2)
    W, P = (G, O) if m <= n else (T(G), T(O))  # the wide orientation, s × l
    U, sig_g, Vh = np.linalg.svd(G, full_matrices=False)
    sig_o = np.linalg.svd(O, compute_uv=False)
    H = W @ T(P)
    H = (H + T(H)) / 2
    lam = np.linalg.eigvalsh(H)
    neg, pos = _norm(np.where(lam < 0, lam, 0.0), -1), _norm(np.where(lam > 0, lam, 0.0), -1)
    nuclear = sig_g.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero G: nan residual_error and dual_obj
        return {
            "orth_error": _norm(P @ T(P) - np.eye(s), (-2, -1)) / np.sqrt(s),
            "polar_error": _norm(O - U @ Vh, (-2, -1)) / np.sqrt(s),
            "sigma_min": sig_o.min(axis=-1),
            "sigma_max": sig_o.max(axis=-1),
            "residual_error": _norm(H @ P - W, (-2, -1)) / _norm(G, (-2, -1)),
            "psd_error": np.where(neg == 0, 0.0, neg / pos),
            "dual_obj": (nuclear - np.sum(G * O, axis=(-2, -1))) / nuclear,
            "bound_violation": np.maximum(sig_o.max(axis=-1) - 1, 0.0),
        }
