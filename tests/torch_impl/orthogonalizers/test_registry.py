"""torch_impl.orthogonalizers.registry: the named orthogonalizers, their schedules and step counts (spec §1),
each registered function's shapes, dtypes and bad inputs, and its tall / batched agreement."""


from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.orthogonalizer_bad_inputs import BAD_INPUTS
from tests.orthogonalizer_cases import identity, matrix, rel_err
from tests.rounding_bounds import FP32_U, gram_condition, ns_condition, tolerance
from torch_impl.orthogonalizers.aol import aol
from torch_impl.orthogonalizers.gram_newton_schulz import gram_newton_schulz
from torch_impl.orthogonalizers.newton_schulz import (
    newton_schulz,
    polar_express,
)
from torch_impl.orthogonalizers.registry import (
    NS_EPS,
    ORTHOGONALIZER_SCHEDULES,
    ORTHOGONALIZERS,
    default_steps,
)
from torch_impl.orthogonalizers.schedules import SCHEDULES, cans, cubic, deepseek_v4

NAMES = sorted(ORTHOGONALIZERS)


PUBLIC = {"newton_schulz": newton_schulz, "polar_express": polar_express, "gram_newton_schulz": gram_newton_schulz,
          "aol": aol, "cans": cans, "cubic": cubic, "deepseek_v4": deepseek_v4}


SPEC = Path(__file__).resolve().parents[3] / ".specs" / "orthogonalizers.md"


def spec_registry() -> dict[str, str]:
    """name -> the 'steps supported (default)' cell of the registry table in spec §1."""
    text = SPEC.read_text()
    section = text[text.index("## §1"):text.index("## §2")]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    return {row[1].strip().strip("`"): row[-2].strip() for row in rows}


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def fp32_tolerance(name):
    """2·u·κ of the named orthogonalizer at its default steps (rounding_bounds.py)."""
    s = SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]]
    triples = s.triples(s.default_steps)
    kappa = ns_condition(triples, 1 / s.norm_scale)
    if name == "gram_newton_schulz":
        kappa += gram_condition(triples, (2,), 1 / s.norm_scale)
    return tolerance(FP32_U, kappa)


def orth(name, X, dtype=torch.float32):
    return ORTHOGONALIZERS[name](X, steps=default_steps(name), eps=NS_EPS, compute_dtype=dtype)


def test_registry_names_and_schedules():
    # The JAX registry's names, in its order (equality of the two registries is checked in
    # parity_tests, which may import both frameworks); here against spec §1's table.
    names = ("newton_schulz", "polar_express", "gram_newton_schulz", "aol", "cans", "cubic", "deepseek_v4")
    assert tuple(ORTHOGONALIZERS) == names == tuple(spec_registry())
    assert tuple(ORTHOGONALIZER_SCHEDULES) == names
    assert ORTHOGONALIZER_SCHEDULES["gram_newton_schulz"] == "polar_express"
    assert all(ORTHOGONALIZER_SCHEDULES[n] == n for n in names if n != "gram_newton_schulz")
    for name, fn in ORTHOGONALIZERS.items():  # the public function, its own finite check off (Muon checks)
        assert isinstance(fn, functools.partial) and fn.func is PUBLIC[name], name
        assert fn.args == () and fn.keywords == {"check_finite": False}, name


def test_default_steps_follow_the_spec_table():
    expected = {"newton_schulz": 5, "polar_express": 5, "gram_newton_schulz": 5, "aol": 4, "cans": 5, "cubic": 5,
                "deepseek_v4": 10}
    assert {name: default_steps(name) for name in ORTHOGONALIZERS} == expected
    words = {"≥ 1": "steps >= 1", "≥ 10": "steps >= 10", "1..5": "1 <= steps <= 5", "exactly 5": "steps = 5 only"}
    for name, cell in spec_registry().items():
        assert int(re.findall(r"\((\d+)\)", cell)[0]) == default_steps(name), name
        rule = next(words[k] for k in sorted(words, key=len, reverse=True) if cell.startswith(k))
        assert SCHEDULES[ORTHOGONALIZER_SCHEDULES[name]].supported() == rule, name
    assert default_steps(identity) == 5  # a callable: Muon's default


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_zero_and_bad_inputs(name):
    G = torch.from_numpy(matrix("gaussian", 2, 2 * 8, 32).reshape(2, 8, 32)).bfloat16()
    out = orth(name, G, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 32)
    assert torch.equal(orth(name, torch.zeros(8, 32)), torch.zeros(8, 32))  # zero maps to zero
    for case, (x, message) in BAD_INPUTS.items():
        with pytest.raises(ValueError, match=message):  # the public function checks everything
            PUBLIC[name](torch.from_numpy(x), steps=default_steps(name))
        if case in ("nan", "inf"):  # the registered one leaves non-finite input to Muon's per-step check
            assert not torch.isfinite(orth(name, torch.from_numpy(x))).all()
        else:
            with pytest.raises(ValueError, match=message):
                orth(name, torch.from_numpy(x))


@pytest.mark.parametrize("name", NAMES)
def test_tall_and_batch_agree(name):
    # The same math each way in other summation orders: each within 2·u·κ of the exact result, so
    # within twice that of each other. A missing transpose-back or a mixed-up batch is O(1).
    G = torch.from_numpy(matrix("gaussian", 9, 2 * 8, 32).reshape(2, 8, 32))
    base = f64(orth(name, G))
    tol = 2 * fp32_tolerance(name)
    tall = f64(orth(name, G.mT.contiguous()))
    assert rel_err(np.swapaxes(tall, -1, -2), base) <= tol
    looped = np.stack([f64(orth(name, G[i])) for i in range(2)])
    assert rel_err(looped, base) <= tol
    if name == "aol":  # a square matrix is "wide": AOL scales its rows, its transpose's columns (spec §4)
        S = G[0, :, :8] * torch.logspace(0, -1, 8)[:, None]
        assert rel_err(f64(orth(name, S.mT.contiguous())).T, f64(orth(name, S))) > 1e-3
