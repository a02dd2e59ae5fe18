"""Learning-rate schedules at hand-checked points."""

import math

import pytest

from algorithms.schedule import learning_rate


def test_warmup_then_constant():
    lrs = [learning_rate(s, 10, 1.0, "constant", warmup_steps=4) for s in range(6)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_decay_reaches_floor_on_last_step():
    lrs = [learning_rate(s, 5, 2.0, "linear", 0, 0.1) for s in range(5)]
    # progress = s / 4; lr = 2 * (1 - 0.9 * progress)
    assert lrs == pytest.approx([2.0, 1.55, 1.1, 0.65, 0.2])


def test_cosine_midpoint_and_end():
    assert learning_rate(0, 5, 1.0, "cosine", 0, 0.0) == pytest.approx(1.0)
    assert learning_rate(2, 5, 1.0, "cosine", 0, 0.0) == pytest.approx(0.5)
    assert learning_rate(4, 5, 1.0, "cosine", 0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(1, 5, 1.0, "cosine", 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate(3, 5, 1.0, "exp")
