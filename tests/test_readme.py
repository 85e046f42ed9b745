"""The README's bad-input table points at real tests: every row names at least one test, every
`file::test` it names exists, and every case id it quotes in parentheses is a case of that file's
table (so renaming or deleting a test cannot leave the README claiming coverage that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

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
