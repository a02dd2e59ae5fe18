"""Rewards -> advantages (docs/ALGORITHMS.md section 8): hand-computed values for every option.

Expected values are literals or short numpy formulas of the hand computation (mean, Bessel std,
eps = 1e-4), never calls of the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from algorithms.rl.advantages import group_advantages, zero_std_groups

NAN = np.nan
EPS = 1e-4


def _quiet(fn, *args, **kw):
    """Call ``fn`` turning any numpy warning or floating-point error into a failure."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return fn(*args, **kw)


def test_mixed_group_and_all_equal_group():
    # group 1: mean 0.5, deviations +-0.5, Bessel std sqrt((4 * 0.25) / 3); group 2: all equal
    rewards = np.array([[1.0], [0.0], [0.0], [1.0], [2.0], [2.0], [2.0], [2.0]])
    adv, stats = _quiet(group_advantages, rewards, [1.0], 4)
    a = 0.5 / (np.sqrt(1 / 3) + EPS)
    np.testing.assert_allclose(adv, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-12, atol=1e-12)
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["reward"] == pytest.approx(1.25)
    assert stats["rewards/func_0/mean"] == pytest.approx(1.25)
    # population std of [1, 0, 0, 1, 2, 2, 2, 2]: mean 1.25, squares sum 5.5 / 8
    assert stats["reward_std"] == pytest.approx(np.sqrt(5.5 / 8))


def test_none_rewards_are_ignored_and_lone_or_empty_rows_get_zero():
    # group 1: scored values 1 and 0 (mean 0.5, Bessel std sqrt(0.5)); the NaN rows get 0
    # group 2: a single scored value: std undefined -> 0, A = 0 / eps = 0
    # group 3: nothing scored: every A = 0, and no numpy warning on the empty group
    rewards = np.array([1.0, NAN, 0.0, NAN, NAN, 3.0, NAN, NAN, NAN, NAN, NAN, NAN])[:, None]
    adv, stats = _quiet(group_advantages, rewards, [1.0], 4)
    a = 0.5 / (np.sqrt(0.5) + EPS)
    np.testing.assert_allclose(adv, [a, 0, -a, 0] + [0] * 8, rtol=1e-12, atol=1e-12)
    assert not np.isnan(adv).any()
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert stats["reward"] == pytest.approx(4 / 3)  # mean of 1, 0, 3


def test_two_functions_with_weights_and_an_all_none_row():
    rewards = np.array([
        [1.0, 2.0],   # R = 1 + 0.5 * 2 = 2
        [0.0, NAN],   # R = 0 (the None of function 2 is skipped)
        [NAN, NAN],   # unscorable: R = NaN -> A = 0
        [1.0, 0.0],   # R = 1, alone in its group -> A = 0
    ])
    adv, stats = _quiet(group_advantages, rewards, [1.0, 0.5], 2, names=["acc", "fmt"])
    a = 1.0 / (np.sqrt(2.0) + EPS)  # group [2, 0]: mean 1, Bessel std sqrt(2)
    np.testing.assert_allclose(adv, [a, -a, 0.0, 0.0], rtol=1e-12, atol=1e-12)
    assert stats["rewards/acc/mean"] == pytest.approx(2 / 3)
    assert stats["rewards/fmt/mean"] == pytest.approx(1.0)
    assert stats["reward"] == pytest.approx(1.0)  # mean of 2, 0, 1


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scale_rewards(scale):
    # groups [0, 1] and [0, 3]: means 0.5 and 1.5
    rewards = np.array([[0.0], [1.0], [0.0], [3.0]])
    centred = np.array([-0.5, 0.5, -1.5, 1.5])
    expected = {
        # Bessel std of each group: sqrt(0.5) and sqrt(4.5)
        "group": centred / (np.array([np.sqrt(0.5)] * 2 + [np.sqrt(4.5)] * 2) + EPS),
        # Bessel std of the batch [0, 1, 0, 3]: mean 1, squares 1 + 0 + 1 + 4 = 6, / 3
        "batch": centred / (np.sqrt(2.0) + EPS),
        "none": centred,
    }[scale]
    adv, _ = _quiet(group_advantages, rewards, [1.0], 2, scale)
    np.testing.assert_allclose(adv, expected, rtol=1e-12, atol=1e-12)


def test_normalize_then_sum_gdpo():
    rewards = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 4.0]])
    # function 1: group 1 [1, 0] -> +-0.5 / (sqrt(0.5) + eps); group 2 all equal -> 0
    a = 0.5 / (np.sqrt(0.5) + EPS)
    # function 2: group 1 all equal -> 0; group 2 [0, 4] -> -+2 / (sqrt(8) + eps)
    b = 2.0 / (np.sqrt(8.0) + EPS)
    summed = np.array([a, -a, -2 * b, 2 * b])  # weights 1 and 2; batch mean is 0
    std = np.sqrt((2 * a**2 + 8 * b**2) / 3)    # Bessel std of the batch
    adv, _ = _quiet(group_advantages, rewards, [1.0, 2.0], 2, "group", "normalize_then_sum")
    np.testing.assert_allclose(adv, summed / (std + EPS), rtol=1e-12, atol=1e-12)
    # sum_then_normalize on the same rewards differs: totals [1, 0, 1, 9]
    plain, _ = group_advantages(rewards, [1.0, 2.0], 2)
    np.testing.assert_allclose(plain, [a, -a, -4 / (np.sqrt(32) + EPS), 4 / (np.sqrt(32) + EPS)],
                               rtol=1e-12)


def test_normalize_then_sum_keeps_unscorable_rows_out_of_the_batch_stats():
    rewards = np.array([[1.0], [0.0], [NAN], [NAN]])
    a = 0.5 / (np.sqrt(0.5) + EPS)
    # batch stats over [a, -a] only: mean 0, Bessel std sqrt(2) a
    adv, _ = _quiet(group_advantages, rewards, [1.0], 2, "group", "normalize_then_sum")
    np.testing.assert_allclose(adv, [a / (np.sqrt(2) * a + EPS), -a / (np.sqrt(2) * a + EPS), 0, 0],
                               rtol=1e-12)


def test_n_not_a_multiple_of_g_is_an_error():
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(np.zeros((6, 1)), [1.0], 4)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        zero_std_groups(np.zeros(5), 2)


def test_bad_weights_and_options_are_errors():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        group_advantages(np.zeros((4, 1)), [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(np.zeros((4, 1)), [1.0], 2, "std")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        group_advantages(np.zeros((4, 1)), [1.0], 2, "group", "average")


def test_zero_std_groups():
    total = np.array([
        1.0, 1.0, 1.0,           # all equal
        0.0, 1.0, 0.0,           # informative
        NAN, 2.0, 2.0,           # equal once the None is ignored
        NAN, NAN, NAN,           # nothing scored
        NAN, 5.0, NAN,           # one value: nothing to compare
        1.0, 1.0 + 1e-12, 1.0,   # equal up to rounding
        NAN, 0.0, 1.0,           # informative despite a None
    ])
    flat = _quiet(zero_std_groups, total, 3)
    assert flat.tolist() == [True, False, True, True, True, True, False]
