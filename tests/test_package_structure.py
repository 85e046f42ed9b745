"""The architecture, read from the code: import statements, calls and sizes.

- no import cycle inside torch_impl, jax_reference or benchmarks;
- torch_impl and jax_reference never import each other (only tests and benchmarks import both);
- the layers are folders, and each folder imports only the layers below it (FOLDER_RULES): the
  models and the orthogonalizers are ground floors, sharding never reaches up into optim,
  training or tools, nothing imports tools; inside a package nothing imports a package's face
  (its __init__), so this graph is the whole graph;
- torch_impl's top level holds only the packages and the thin command entry points;
- every torch.distributed collective of torch_impl and benchmarks is called in
  torch_impl/sharding/comm.py (which places its tensors on the collective's device), except the
  ones listed in COLLECTIVE_EXCEPTIONS with the reason;
- jax_reference mirrors torch_impl folder for folder and shares its module names (MIRRORED);
- no file over 450 lines, no function over 80 lines in the packages and benchmarks
  (SIZE_EXCEPTIONS, with the reason);
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

# folder -> the folders of the same package it may import (itself always)
FOLDER_RULES = {
    "torch_impl": {
        "models": set(),
        "orthogonalizers": set(),
        "data": set(),
        "sharding": set(),
        "optim": {"orthogonalizers", "sharding"},
        "training": {"models", "orthogonalizers", "data", "sharding", "optim"},
        "tools": {"models", "data", "training"},
    },
    "jax_reference": {
        "models": set(),
        "orthogonalizers": set(),
        "sharding": set(),
        "optim": {"orthogonalizers", "sharding"},
    },
}
ENTRY_POINTS = {"train": "training.main", "launch": "training.launch", "sample": "tools.sample",
                "export": "tools.export", "plot": "tools.plot"}

# Collectives outside torch_impl/sharding/comm.py, each with its reason.
COMMUNICATION_MODULE = "torch_impl/sharding/comm.py"
COLLECTIVE_EXCEPTIONS = {
    # times the raw gloo/NCCL collectives side by side with the optimizers' wrapped ones: the
    # thing measured is the collective itself
    "benchmarks/distributed.py": {"all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "barrier",
                                  "all_gather_object"},
}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "all_gather_object",
               "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "barrier", "monitored_barrier",
               "send", "recv", "isend", "irecv", "batch_isend_irecv"}

# Modules both frameworks have, by the same path (the concept exists on both sides).
MIRRORED = ["models/gpt", "orthogonalizers/newton_schulz", "orthogonalizers/schedules",
            "orthogonalizers/gram_newton_schulz", "orthogonalizers/aol", "orthogonalizers/quality",
            "orthogonalizers/registry", "orthogonalizers/balance", "optim/muon", "optim/adamw", "optim/hybrid",
            "optim/nonfinite", "sharding/placement"]

MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80
SIZE_EXCEPTIONS: dict[str, str] = {}  # "path" or "path::function" -> the reason it is longer


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


def modules_of(package: str) -> dict[str, Path]:
    return {module_name(f): f for f in (ROOT / package).rglob("*.py") if f.stem != "__init__"}


def import_graph(package: str) -> dict[str, set[str]]:
    modules = modules_of(package)
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


@pytest.mark.parametrize("package", [*PACKAGES, "benchmarks"])
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


def face_imports(path: Path, package: str) -> set[str]:
    """`from <package>.<folder> import name` where name is not a module of that folder: a name the
    folder's __init__ hands on (its face), which hides the defining module from the graph."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in {
                f"{package}.{folder}" for folder in FOLDER_RULES[package]}:
            folder = ROOT.joinpath(*node.module.split("."))
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if not (folder / f"{a.name}.py").is_file() and not (folder / a.name).is_dir())
    return found


def folder_violations(package: str) -> list[str]:
    rules = FOLDER_RULES[package]
    bad = []
    for module, path in modules_of(package).items():
        parts = module.split(".")
        if len(parts) == 2:  # a top-level entry point: it imports its command's module only
            continue
        folder = parts[1]
        assert folder in rules, f"{module}: folder {folder!r} has no rule in FOLDER_RULES"
        for imported in face_imports(path, package):
            bad.append(f"{module} imports {imported} from a package face (import the module that defines it)")
        for imported in imports_of(path):
            target = imported.split(".")
            if target[0] == package and len(target) > 2 and target[1] != folder and target[1] not in rules[folder]:
                bad.append(f"{module} ({folder}) imports {imported} ({target[1]})")
    return sorted(set(bad))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_folder_imports_only_the_layers_below_it(package):
    assert folder_violations(package) == []


def test_the_folder_rule_catches_a_planted_upward_import(tmp_path, monkeypatch):
    planted = ROOT / "torch_impl" / "sharding" / "zz_planted.py"
    planted.write_text("from torch_impl.optim.muon import Muon\nfrom torch_impl.optim import AdamW\n")
    try:
        found = folder_violations("torch_impl")
    finally:
        planted.unlink()
    assert any("zz_planted imports torch_impl.optim.AdamW from a package face" in v for v in found)
    assert any("zz_planted (sharding) imports torch_impl.optim.muon.Muon (optim)" in v for v in found)


def test_the_model_is_the_ground_floor():
    torch_gpt = imports_of(ROOT / "torch_impl" / "models" / "gpt.py")
    assert not {i for i in torch_gpt if i.startswith("torch.distributed")}
    assert not {i for i in torch_gpt if i.startswith("torch_impl.")}, "gpt.py imports nothing of the package"
    jax_gpt = imports_of(ROOT / "jax_reference" / "models" / "gpt.py")
    assert not {i for i in jax_gpt if i.startswith(("optax", "jax_reference.optim"))}


def test_top_level_holds_only_the_packages_and_thin_entry_points():
    top = {p.name for p in (ROOT / "torch_impl").iterdir() if not p.name.startswith(("__pycache__", "."))}
    assert top == {"__init__.py", *FOLDER_RULES["torch_impl"], *(f"{e}.py" for e in ENTRY_POINTS)}
    for entry, target in ENTRY_POINTS.items():
        path = ROOT / "torch_impl" / f"{entry}.py"
        assert {i for i in imports_of(path) if i.startswith("torch_impl")} == {
            f"torch_impl.{target}", f"torch_impl.{target}.main"}, entry
        assert len(path.read_text().splitlines()) <= 10, f"{entry}.py is not a thin entry point"
    assert {p.name for p in (ROOT / "jax_reference").iterdir() if p.suffix == ".py"} == {"__init__.py"}


def collective_calls(path: Path) -> set[str]:
    """Names of torch.distributed collectives called in the file: `dist.X(...)`, `torch.distributed.X(...)`
    or a bare X imported from torch.distributed."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    bare = {}  # local name -> collective
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name == "torch.distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            bare.update({a.asname or a.name: a.name for a in node.names if a.name in COLLECTIVES})
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            found.add(f.attr)
        elif isinstance(f, ast.Name) and f.id in bare:
            found.add(bare[f.id])
    return found


def test_collectives_are_called_only_in_the_communication_module():
    called = {}
    for root in ("torch_impl", "benchmarks"):
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            names = collective_calls(path) - COLLECTIVE_EXCEPTIONS.get(rel, set())
            if names and rel != COMMUNICATION_MODULE:
                called[rel] = sorted(names)
    assert called == {}, f"collectives outside {COMMUNICATION_MODULE}: {called}"
    assert {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"} <= \
        collective_calls(ROOT / COMMUNICATION_MODULE)  # the scan sees the calls where they are


def test_the_collective_scan_sees_each_spelling(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nimport torch.distributed as dist\nfrom torch.distributed import barrier as b\n"
                 "dist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\nb()\ndist.get_rank()\n")
    assert collective_calls(f) == {"all_reduce", "broadcast", "barrier"}


def test_jax_reference_mirrors_torch_impl():
    for module in MIRRORED:
        for package in PACKAGES:
            assert (ROOT / package / f"{module}.py").is_file(), f"{package}/{module}.py"
    assert set(FOLDER_RULES["jax_reference"]) <= set(FOLDER_RULES["torch_impl"])
    for package in PACKAGES:  # the tests mirror the packages
        for folder in FOLDER_RULES[package]:
            if folder in ("training", "tools"):
                continue  # exercised end to end in tests/train
            assert (ROOT / "tests" / package / folder).is_dir(), f"tests/{package}/{folder}"


def test_files_and_functions_stay_small():
    big = []
    for package in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            text = path.read_text()
            if len(text.splitlines()) > MAX_FILE_LINES and rel not in SIZE_EXCEPTIONS:
                big.append(f"{rel}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES and f"{rel}::{node.name}" not in SIZE_EXCEPTIONS:
                        big.append(f"{rel}::{node.name}: {n} lines")
    assert big == []


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
    "torch_impl": ("orthogonalizers/newton_schulz", "orthogonalizers/registry", "optim/muon", "optim/adamw",
                   "optim/base", "optim/hybrid", "optim/nonfinite", "sharding/placement", "sharding/comm",
                   "training/lr_schedule"),
    "jax_reference": ("orthogonalizers/newton_schulz", "orthogonalizers/registry", "optim/muon", "optim/adamw",
                      "optim/hybrid", "optim/nonfinite", "optim/precision", "sharding/placement")}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_optimizer_module_has_its_own_test_file(package):
    for module in OPTIMIZER_MODULES[package]:
        folder, _, name = module.rpartition("/")
        dotted = f"{package}.{module.replace('/', '.')}"
        assert (ROOT / package / f"{module}.py").is_file(), module
        test_file = ROOT / "tests" / package / folder / f"test_{name}.py"
        assert test_file.is_file(), f"no {test_file.relative_to(ROOT)}"
        assert dotted in imports_of(test_file), f"{test_file.name} does not import {dotted}"
