"""Hypothesis profiles for the whole suite, chosen by HYPOTHESIS_PROFILE.

ci:       derandomized, no example database, modest example counts (default when CI=true)
dev:      random with the local database, so a failure shrinks and replays (default)
thorough: many more examples, for a change to the optimizer before trusting it
"""

import os

from hypothesis import HealthCheck, settings

# First calls compile (jax.jit) or spin up BLAS: no per-example deadline.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=15,
                          print_blob=True, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Tests compare eager torch with jax.jit; compiled torch is tested separately.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
