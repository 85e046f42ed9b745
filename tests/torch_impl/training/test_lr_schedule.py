"""LR and Muon momentum schedules at the steps where their pieces meet (nanochat's formulas)."""

import pytest

from torch_impl.training.lr_schedule import lr_multiplier, muon_momentum, validate


def test_flat_then_linear_warmdown():
    # 100 steps, warmdown 0.2: flat through step 80, then (100 - step) / 20 down to 1/20 at the last step
    lrm = [lr_multiplier(s, 100) for s in range(100)]
    assert lrm[0] == lrm[50] == lrm[80] == 1.0
    assert lrm[81] == pytest.approx(19 / 20)
    assert lrm[90] == pytest.approx(0.5)
    assert lrm[99] == pytest.approx(1 / 20)  # the last step still moves the weights
    assert all(a >= b for a, b in zip(lrm, lrm[1:]))


def test_warmup_and_final_lr_frac():
    # 10 warmup steps reach 1.0 at step 9; the warmdown lands on final_lr_frac + (1 - frac) / warmdown
    # pytest.approx here: default rel 1e-6 absorbs float64 rounding of a few arithmetic ops only
    assert lr_multiplier(0, 100, warmup_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(4, 100, warmup_ratio=0.1) == pytest.approx(0.5)
    assert lr_multiplier(9, 100, warmup_ratio=0.1) == 1.0
    assert lr_multiplier(10, 100, warmup_ratio=0.1) == 1.0
    assert lr_multiplier(90, 100, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(99, 100, warmdown_ratio=0.2, final_lr_frac=0.1) == pytest.approx(0.05 + 0.95 * 0.1)


def test_no_warmdown_is_constant():
    assert {lr_multiplier(s, 7, warmdown_ratio=0.0) for s in range(7)} == {1.0}


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(5, warmup_steps=0) == 0.95


@pytest.mark.parametrize("kwargs", [dict(num_steps=0, warmup_ratio=0, warmdown_ratio=0.2, final_lr_frac=0),
                                    dict(num_steps=10, warmup_ratio=-0.1, warmdown_ratio=0.2, final_lr_frac=0),
                                    dict(num_steps=10, warmup_ratio=0.6, warmdown_ratio=0.6, final_lr_frac=0),
                                    dict(num_steps=10, warmup_ratio=0, warmdown_ratio=0.2, final_lr_frac=1.5)])
def test_validate_rejects(kwargs):
    with pytest.raises(ValueError):
        validate(**kwargs)
