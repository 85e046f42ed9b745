"""Outside implementations the benchmarks compare against, behind one small interface each.

- torch.optim.Muon's Newton-Schulz: its private `torch.optim._muon._zeropower_via_newtonschulz`
  (NS5 coefficients, 5 steps). It casts to bf16 internally whatever the input dtype, so its
  results are bf16-accurate; on CPUs without AVX512-BF16/AMX that GEMM is emulated and very slow.
- optax's Newton-Schulz: `optax.contrib._muon.orthogonalize_via_newton_schulz` (the function
  optax.contrib.muon calls; not exported by optax.contrib), under jax.jit, vmapped over stacks.
  It computes in the input dtype with the coefficients cast to it.
- nanochat's Muon: its optim.py is *not* part of this repository. Set NANOCHAT_OPTIM to the path of
  a copy of nanochat/optim.py, e.g.
      git -C /work/.mirror/karpathy+nanochat/repo show HEAD:nanochat/optim.py > /tmp/nanochat_optim.py
      export NANOCHAT_OPTIM=/tmp/nanochat_optim.py
  and its text is executed at run time in a throwaway module (its one import from nanochat,
  `nanochat.common.COMPUTE_DTYPE`, is provided by a stub). Its torch.compile'd fused step is run
  eagerly (the callable torch.compile wraps) unless compiled mode is asked for. Without the
  variable, or with an incompatible version, the nanochat rows are skipped with the reason printed.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

from torch_impl.orthogonalizers.newton_schulz import NS5_COEFFS, POLAR_EXPRESS_COEFFS
from torch_impl.orthogonalizers.schedules import SCHEDULES

NANOCHAT_ENV = "NANOCHAT_OPTIM"


def bf16_gemm_native(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on `device` ("cuda", or a CPU with AVX512-BF16 / AMX-BF16)."""
    if device == "cuda":
        return True
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


# ---- torch.optim.Muon ------------------------------------------------------------------------

def torch_optim_ns(X: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's NS5 on each matrix of X (a loop: it takes 2-D input only). Returns bf16."""
    from torch.optim import _muon
    flat = X.reshape(-1, *X.shape[-2:])
    coeffs = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
    out = [_muon._zeropower_via_newtonschulz(x, coeffs, _muon.DEFAULT_NS_STEPS, _muon.EPS) for x in flat]
    return torch.stack(out).reshape(X.shape)


# ---- optax -----------------------------------------------------------------------------------

def optax_orthogonalizers() -> dict[str, tuple[str, int, object]]:
    """{registered method it corresponds to: (label, steps, jitted f(x))} for optax's NS with
    NS5, with the Polar Express table (optax's Frobenius normalisation has no 1.01 scale), and with
    AOL preconditioning and You's last 4 triples (Turbo-Muon's; eps 1e-7 as ours)."""
    from optax.contrib._muon import orthogonalize_via_newton_schulz as ns

    def make(coeffs, steps, **kw):
        table = jnp.asarray(coeffs, jnp.float32)
        one = lambda x: ns(x, table.astype(x.dtype), steps, **kw)
        return jax.jit(lambda x: jax.vmap(one)(x) if x.ndim == 3 else one(x))

    return {
        "newton_schulz": ("optax NS5 (jit)", 5, make(NS5_COEFFS, 5)),
        "polar_express": ("optax PE table, no 1.01 (jit)", 5, make(POLAR_EXPRESS_COEFFS, 5)),
        "aol": ("optax AOL, You's last 4 (jit)", 4, make(SCHEDULES["aol"].triples(4), 4, preconditioning="aol",
                                                          eps=1e-7)),
    }


# ---- nanochat --------------------------------------------------------------------------------

def load_nanochat(compute_dtype: torch.dtype = torch.float32) -> tuple[types.ModuleType | None, str]:
    """(module, description) of the nanochat optim.py that NANOCHAT_OPTIM names, or (None, why not)."""
    path = os.environ.get(NANOCHAT_ENV)
    if not path:
        return None, f"{NANOCHAT_ENV} not set"
    try:
        text = Path(path).read_text()
    except OSError as e:
        return None, f"{NANOCHAT_ENV}={path}: {e}"
    common = types.ModuleType("nanochat.common")
    common.COMPUTE_DTYPE = compute_dtype
    package = types.ModuleType("nanochat")
    package.common = common
    saved = {k: sys.modules.get(k) for k in ("nanochat", "nanochat.common")}
    sys.modules.update({"nanochat": package, "nanochat.common": common})
    module = types.ModuleType("nanochat_optim_benchmarked")
    module.__file__ = path
    try:
        exec(compile(text, path, "exec"), module.__dict__)
    except Exception as e:  # an incompatible nanochat version: skip, saying why
        return None, f"{path}: {type(e).__name__}: {e}"
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    missing = [n for n in ("muon_step_fused", "MuonAdamW", "polar_express_coeffs") if not hasattr(module, n)]
    if missing:
        return None, f"{path}: no {', '.join(missing)} (another nanochat version)"
    compiled = module.muon_step_fused
    eager = getattr(compiled, "_torchdynamo_orig_callable", None) or getattr(compiled, "__wrapped__", None)
    if eager is None:
        return None, f"{path}: muon_step_fused is not a torch.compile wrapper"
    module.benchmark_steps = {"eager": eager, "compiled": compiled}
    return module, f"nanochat optim.py from {path}"


def nanochat_mode(module, mode: str, compute_dtype: torch.dtype) -> None:
    """Make the module's MuonAdamW call its fused step `mode` ("eager" or "compiled"), computing
    in `compute_dtype` (its COMPUTE_DTYPE: bf16 casts to bf16, anything else stays in the input dtype)."""
    module.muon_step_fused = module.benchmark_steps[mode]
    module.COMPUTE_DTYPE = compute_dtype


def nanochat_optimizer(module, params: list[torch.nn.Parameter], lr: float = 0.02):
    """nanochat's MuonAdamW with one "muon" group per parameter shape (its stacking rule)."""
    groups: dict[tuple, list] = {}
    for p in params:
        groups.setdefault(tuple(p.shape), []).append(p)
    return module.MuonAdamW([dict(kind="muon", params=ps, lr=lr, momentum=0.95, ns_steps=5, beta2=0.95,
                                  weight_decay=0.0) for ps in groups.values()])


def nanochat_fused_step(module, G: torch.Tensor, lr: float = 0.02):
    """A zero-argument call of nanochat's fused step on the stack G (B, m, n) (or one matrix): the
    per-call cost of its Polar Express plus momentum, MuonEq, Muon+, NorMuon and the update."""
    X = G.reshape(-1, *G.shape[-2:]).clone()
    B, m, n = X.shape
    params, momentum = torch.zeros_like(X), torch.zeros_like(X)
    second = torch.zeros((B, m, 1) if m >= n else (B, 1, n), dtype=X.dtype, device=X.device)
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    args = (t(0.95), t(lr), t(0.0), t(0.95), 5, -1 if m >= n else -2)
    return lambda: module.muon_step_fused(X, params, momentum, second, *args)


def nanochat_orthogonalize(module, G: torch.Tensor) -> torch.Tensor:
    """nanochat's orthogonalized direction for G: its fused step from zero parameters with momentum 0,
    lr 1, no weight decay and NorMuon held neutral (beta2 = 1 on a second-moment buffer of ones), so
    the parameters end at −Muon+(PolarExpress(MuonEq(G))). That is what its step applies: note
    MuonEq changes the matrix being orthogonalized, so this is not an approximation of G's polar
    factor alone."""
    X = G.reshape(-1, *G.shape[-2:]).float().clone()
    B, m, n = X.shape
    params, momentum = torch.zeros_like(X), torch.zeros_like(X)
    second = torch.ones((B, m, 1) if m >= n else (B, 1, n), device=X.device)
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    module.muon_step_fused(X, params, momentum, second, t(0.0), t(1.0), t(0.0), t(1.0), 5, -1 if m >= n else -2)
    return (-params).reshape(G.shape)
