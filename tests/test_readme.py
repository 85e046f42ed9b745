"""The README's bad-input table points at real tests: every row names at least one test, every
`file::test` it names exists, and every case id it quotes in parentheses is a case of that file's
table (so renaming or deleting a test cannot leave the README claiming coverage that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bad_input_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Bad input"):]
    section = section[:section.index("\n## ", 1)]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]


def test_every_bad_input_row_names_tests_that_exist():
    rows = bad_input_rows()
    assert len(rows) >= 20
    for row in rows:
        test_cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        files = re.findall(r"`((?:tests|parity_tests)/[\w/]+\.py)", test_cell)
        assert files, f"row names no test file: {row}"
        current = None
        for ref in re.finditer(r"`((?:tests|parity_tests)/[\w/]+\.py)?(?:::(\w+))?`(?: \(([^)]*)\))?", test_cell):
            path, name, cases = ref.groups()
            current = path or current
            source = (REPO / current).read_text()
            if name:
                assert f"def {name}(" in source, f"{current} has no test {name} (README row: {row})"
            for case in re.findall(r"`([^`]+)`", cases or ""):
                assert f'"{case}":' in source, f"{current} has no case {case!r} (README row: {row})"


# -- the names the documents use exist ------------------------------------------------------

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / ".specs").glob("*.md"))]
OUTSIDE_PATHS = {"tests/stress_test.py"}  # Gram-NS's upstream test file, cited in .specs/orthogonalizers.md


def top_level_names(path: Path) -> set[str]:
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dotted_name_exists(name: str) -> bool:
    """`pkg.folder.module.attr...`: the longest prefix that is a module file (or package), then its
    first remaining part defined at that module's top level."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:k])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[k:]
            return not rest or rest[0] in ("py", "md") or rest[0] in top_level_names(module)
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_and_module_the_documents_name_exists(doc):
    text = (REPO / doc).read_text()
    roots = "torch_impl|jax_reference|benchmarks|tests|parity_tests"
    paths = set(re.findall(rf"(?<![\w./-])((?:{roots})/[\w/]+\.(?:py|sh))", text)) - OUTSIDE_PATHS
    assert sorted(p for p in paths if not (REPO / p).is_file()) == []
    dotted = set(re.findall(r"(?<![\w./-])((?:torch_impl|jax_reference|benchmarks)(?:\.\w+)+)", text))
    assert sorted(n for n in dotted if not dotted_name_exists(n)) == []


def test_the_name_check_can_fail():
    assert dotted_name_exists("torch_impl.optim.muon.muon_step")
    assert dotted_name_exists("torch_impl.orthogonalizers.registry.ORTHOGONALIZERS")
    assert not dotted_name_exists("torch_impl.optim.muon.ORTHOGONALIZERS")  # moved to the registry
    assert not dotted_name_exists("torch_impl.distributed")
