"""Hypothesis profiles for the whole suite, chosen by HYPOTHESIS_PROFILE.

ci:       derandomized, no example database, modest example counts (default when CI=true)
dev:      random with the local database, so a failure shrinks and replays (default)
thorough: many more examples, for a change to the optimizer before trusting it
mutation: ci without shrinking, for the planted-bug runs (parity_tests/mutation.py): they only
          need to know that a test fails, and shrinking a failure costs most of their time
"""

import os

# JAX's CPU backend has one device unless told otherwise; the sharded-Muon tests
# (tests/jax_reference/sharding/test_sharded.py) need 4. XLA reads the flag once, when jax first starts
# its backend, so it is set here, before any test module imports jax. An XLA_FLAGS already set
# keeps its other flags (and its own device count, if it has one).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# Under pytest-xdist (-n 2, the CI command) each worker computes on one thread: two workers on two
# cores, not two workers × two OpenMP threads (oversubscribed intra-op threads make torch several
# times slower, not faster). Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import HealthCheck, Phase, settings

# First calls compile (jax.jit) or spin up BLAS: no per-example deadline.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=15,
                          print_blob=True, **_common)
settings.register_profile("mutation", settings.get_profile("ci"), phases=(Phase.explicit, Phase.reuse, Phase.generate))
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Tests compare eager torch with jax.jit; compiled torch is tested separately.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


# -- session fixtures shared by tests/ and parity_tests/ ------------------------------------

@pytest.fixture(scope="session")
def rank_groups():
    """One pool of 4 worker processes for the whole session (tests/dist and the
    distributed parity tests): `rank_groups(n)` gives a gloo group of size n on its first n
    workers (`rank_groups(n, "cuda:gloo")`: a gloo group with only a CUDA backend, as NCCL has; re-formed in
    ~0.5 s when n or the backend changes; starting the pool imports torch once, in a
    forkserver the workers are forked from, so it is paid once). Case functions run in the ranks are sent by module
    and name (tests/dist/harness.py), so they live in importable modules, not in a conftest."""
    from tests.dist.harness import RankGroup, RankPool

    pool = RankPool(4)
    yield lambda n, backend="gloo": RankGroup(pool, n, backend)
    pool.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short single-process training run (tests/train/common.py: `TRAINED_ARGS`) shared by
    the training tests and the export parity test: (run directory, the finished subprocess).
    Tests read it and must not change it."""
    from tests.train.common import train_once

    out_dir = tmp_path_factory.mktemp("train") / "run"
    return out_dir, train_once(out_dir)


# -- guard: every test file under the requested folders must collect something ------------
# A folder pytest silently skips (its default norecursedirs once hid tests/dist/) or a file
# whose tests all fail to collect would otherwise pass CI unnoticed. Checked before -m/-k
# deselection; a module skipped at import (pytest.importorskip) counts as accounted for.
from pathlib import Path  # noqa: E402

_skipped_files: set[Path] = set()


def pytest_collectreport(report):
    if report.skipped and report.nodeid.endswith(".py"):
        _skipped_files.add(Path(report.fspath).resolve())


def _test_files(root: Path) -> list[Path]:
    # deliberately not pytest's norecursedirs: the guard exists to catch those patterns
    return [f.resolve() for f in sorted(root.rglob("test_*.py"))
            if not any(part.startswith(".") or part in ("venv", "node_modules")
                       for part in f.relative_to(root).parts[:-1])]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    collected = {Path(str(item.path)).resolve() for item in items}
    missing = []
    for arg in config.args:
        root = Path(config.rootpath, arg.split("::")[0]).resolve()
        if "::" in arg or not root.is_dir():
            continue
        missing += [f for f in _test_files(root) if f not in collected | _skipped_files]
    if missing:
        names = ", ".join(str(f.relative_to(config.rootpath)) for f in missing)
        raise pytest.UsageError(f"test files collected no tests (a norecursedirs pattern or a "
                                f"collection problem?): {names}")
