"""jax_reference.optim.nonfinite: the policy names and error type shared by muon, adamw and the hybrid
(their raise/skip behaviour is tested with each: test_muon.py, test_adamw.py, test_hybrid.py)."""

from jax_reference.optim.nonfinite import NONFINITE_POLICIES, NonFiniteGradientError, check_policy


def test_nonfinite_policy_names():
    assert NONFINITE_POLICIES == ("raise", "skip")
    assert [check_policy(p) for p in NONFINITE_POLICIES] == list(NONFINITE_POLICIES)
    assert issubclass(NonFiniteGradientError, ValueError)  # pytest.raises(ValueError) keeps working
