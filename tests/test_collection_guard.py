"""The suite's collection guard (conftest.py): a test folder that collects nothing fails the
run. pytest's default norecursedirs once hid tests/dist/ from every CI run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_folder_hidden_by_norecursedirs_fails_collection():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-o", "norecursedirs=dist .* venv", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "collected no tests" in out.stdout + out.stderr
    assert "tests/dist/test_sharded_equals_single_device.py" in out.stdout + out.stderr


def test_the_dist_tests_are_collected_by_default():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    assert sum(line.startswith("tests/dist/") for line in out.stdout.splitlines()) >= 40
