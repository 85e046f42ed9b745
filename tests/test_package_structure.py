"""The layering rules of the two packages, read from their import statements.

- no import cycle inside torch_impl or jax_reference;
- torch_impl and jax_reference never import each other (only tests and benchmarks import both);
- the model files are the ground floor: torch_impl/models/gpt.py imports neither an optimizer nor
  torch.distributed, jax_reference/models/gpt.py no optimizer;
- torch_impl imports without JAX installed (a PyTorch user installs only the core).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch_impl", "jax_reference")


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def import_graph(package: str) -> dict[str, set[str]]:
    modules = {module_name(f): f for f in (ROOT / package).rglob("*.py") if f.stem != "__init__"}
    return {m: {i for i in imports_of(f) if i in modules} for m, f in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) >= 5  # the scan found the package's modules
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("package,other", [PACKAGES, PACKAGES[::-1]])
def test_packages_never_import_each_other(package, other):
    offenders = {f.name: sorted(i for i in imports_of(f) if i.split(".")[0] == other)
                 for f in (ROOT / package).rglob("*.py")}
    assert not any(offenders.values()), offenders


def test_the_model_is_the_ground_floor():
    torch_gpt = imports_of(ROOT / "torch_impl" / "models" / "gpt.py")
    assert not {i for i in torch_gpt if i.startswith("torch.distributed")}
    assert not {i for i in torch_gpt if i.startswith("torch_impl.")}, "gpt.py imports nothing of the package"
    jax_gpt = imports_of(ROOT / "jax_reference" / "models" / "gpt.py")
    assert not {i for i in jax_gpt if i.startswith(("optax", "jax_reference.optim"))}


def test_torch_impl_imports_without_jax():
    code = ("import sys\n"
            "for name in ('jax', 'jaxlib', 'optax', 'ml_dtypes'):\n"
            "    sys.modules[name] = None  # any import of them raises ImportError\n"
            "import importlib, pkgutil, torch_impl\n"
            "mods = [m.name for m in pkgutil.walk_packages(torch_impl.__path__, 'torch_impl.')]\n"
            "for m in mods:\n"
            "    importlib.import_module(m)\n"
            "print(len(mods))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) >= 15


# -- where tests live: filed by what they test ---------------------------------------------

def test_framework_comparisons_live_in_parity_tests():
    """Single-framework unit tests live in tests/; a test file importing both torch_impl and
    jax_reference compares them and belongs in parity_tests/."""
    both = []
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        roots = {i.split(".")[0] for i in imports_of(f)}
        if {"torch_impl", "jax_reference"} <= roots:
            both.append(str(f.relative_to(ROOT)))
    assert not both, f"torch-vs-JAX comparisons outside parity_tests/: {both}"
    jax_side = {i.split(".")[0] for f in (ROOT / "tests" / "jax_reference").rglob("test_*.py") for i in imports_of(f)}
    torch_side = {i.split(".")[0] for f in (ROOT / "tests" / "torch_impl").rglob("test_*.py") for i in imports_of(f)}
    assert "torch_impl" not in jax_side and "jax_reference" not in torch_side


# The optimizer family: each module has a unit-test file named after it, on both sides.
OPTIMIZER_MODULES = {
    "torch_impl": ("orthogonalizers/newton_schulz", "optim/muon", "optim/adamw", "optim/base", "sharding/placement",
                   "training/lr_schedule", "optim/nonfinite"),
    "jax_reference": ("orthogonalizers/newton_schulz", "optim/muon", "optim/adamw", "optim/hybrid", "optim/nonfinite",
                      "optim/precision")}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_optimizer_module_has_its_own_test_file(package):
    for module in OPTIMIZER_MODULES[package]:
        folder, _, name = module.rpartition("/")
        dotted = f"{package}.{module.replace('/', '.')}"
        assert (ROOT / package / f"{module}.py").is_file(), module
        test_file = ROOT / "tests" / package / folder / f"test_{name}.py"
        assert test_file.is_file(), f"no {test_file.relative_to(ROOT)}"
        assert dotted in imports_of(test_file), f"{test_file.name} does not import {dotted}"
