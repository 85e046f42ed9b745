"""torch_impl.optim.nonfinite: the policy names, the error type and the decision per step. How the
optimizers apply it (one flag per step, nothing written before raising, every rank agreeing) is
tested with them: tests/torch_impl/optim/test_base.py and tests/dist/test_dist_errors.py."""

import pytest

from torch_impl.optim.nonfinite import NONFINITE_POLICIES, NonFiniteGradientError, check_policy, gradients_ok


def test_nonfinite_policy_names():
    assert NONFINITE_POLICIES == ("raise", "skip")
    assert [check_policy(p) for p in NONFINITE_POLICIES] == list(NONFINITE_POLICIES)
    assert issubclass(NonFiniteGradientError, ValueError)  # pytest.raises(ValueError) keeps working


@pytest.mark.parametrize("policy", ["ignore", "warn", "", None])
def test_unknown_policy_raises_listing_the_valid_ones(policy):
    with pytest.raises(ValueError, match="raise.*skip"):
        check_policy(policy)


@pytest.mark.parametrize("policy", NONFINITE_POLICIES)
def test_no_bad_gradient_means_step(policy):
    assert gradients_ok(policy, []) is True


def test_raise_names_every_bad_parameter():
    with pytest.raises(NonFiniteGradientError, match="a.weight, b.bias") as info:
        gradients_ok("raise", ["a.weight", "b.bias"])
    assert "nothing was updated" in str(info.value)


def test_skip_means_skip_this_step():
    assert gradients_ok("skip", ["a.weight"]) is False
