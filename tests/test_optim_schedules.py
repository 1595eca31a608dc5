"""varlib.training.optim_schedules: the official VAR recipe's schedules and the tokenizer's learning rate."""

import pytest

from varlib.training.optim_schedules import cosine_weight_decay, lin0_lr_factor, lr_multiplier, progressive_num_scales


def test_lin0_schedule_shape():
    total, warmup = 1000, 20
    assert lin0_lr_factor(0, warmup, total) == pytest.approx(0.005)
    assert lin0_lr_factor(10, warmup, total) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lin0_lr_factor(warmup, warmup, total) == 1.0
    assert lin0_lr_factor(warmup + 40, warmup, total) == 1.0  # still inside the flat 5%
    assert lin0_lr_factor(total - 1, warmup, total, end_factor=0.1) == pytest.approx(0.1)
    mid = lin0_lr_factor(warmup + int(0.5 * (total - 1 - warmup)), warmup, total, end_factor=0.0)
    assert mid == pytest.approx(0.5 / 0.95, rel=1e-2)
    assert cosine_weight_decay(0, 100, 0.05, 0.08) == pytest.approx(0.05)
    assert cosine_weight_decay(99, 100, 0.05, 0.08) == pytest.approx(0.08)


def test_progressive_scale_count():
    assert progressive_num_scales(0, 10, 110, 2, 4) == 2
    assert progressive_num_scales(60, 10, 110, 2, 4) == 3
    assert progressive_num_scales(110, 10, 110, 2, 4) == 4
    assert progressive_num_scales(5, 0, 0, 2, 4) == 4


def test_warmup_and_cosine_learning_rate():
    assert [lr_multiplier(s, 4, None, "constant", 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(4, 4, 14, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(9, 4, 14, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(14, 4, 14, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(99, 4, 14, "cosine", 0.1) == pytest.approx(0.1)


def test_cosine_decay_follows_whichever_of_steps_and_time_runs_out_first():
    # Step 9 of 14 after 4 warm-up steps is halfway; half the time gone or less leaves that unchanged.
    assert lr_multiplier(9, 4, 14, "cosine", 0.1, time_fraction=0.25) == pytest.approx(0.55)
    assert lr_multiplier(9, 4, 14, "cosine", 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_multiplier(5, 4, None, "cosine", 0.0, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_multiplier(2, 4, 14, "cosine", 0.1, time_fraction=0.9) == pytest.approx(0.75)  # warm-up goes by steps
    assert lr_multiplier(9, 4, 14, "constant", 0.1, time_fraction=0.9) == 1.0
