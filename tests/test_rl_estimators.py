"""Advantage estimators (algorithms.rl.estimators) against values computed by hand.

Each expected number is written from the formulas in the module docstring with plain
arithmetic in the comments, so a wrong sign, discount, baseline or normaliser fails.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

from algorithms.rl import estimators as est

NAN = float("nan")


def cfg(**kw):
    base = {"advantage_estimator": "gae", "num_generations": 1, "kl_penalty": "reward",
            "beta": 0.0, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95,
            "normalize_advantages": False, "group_baseline": False, "whiten_rewards": False,
            "scale_rewards": "group", "multi_objective_aggregation": "sum_then_normalize"}
    return types.SimpleNamespace(**{**base, **kw})


def test_gae_by_hand_with_a_trajectory_ending_early():
    # gamma 0.9, lam 0.5. Row 0: r = [0, 0, 1], V = [0.5, 0.2, 0.8]:
    #   t2: delta = 1 - 0.8 = 0.2 (V after the last token is 0)           A = 0.2
    #   t1: delta = 0 + 0.9 * 0.8 - 0.2 = 0.52;  A = 0.52 + 0.45 * 0.2 = 0.61
    #   t0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32; A = -0.32 + 0.45 * 0.61 = -0.0455
    # Row 1 ends after 2 tokens: r = [0, 2], V = [1, 1]:
    #   t1: delta = 2 - 1 = 1, A = 1;  t0: delta = 0.9 - 1 = -0.1, A = -0.1 + 0.45 = 0.35
    rewards = np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = np.array([[0.5, 0.2, 0.8], [1.0, 1.0, 7.0]])  # 7.0 sits on padding
    mask = np.array([[1, 1, 1], [1, 1, 0]], float)
    adv, returns = est.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv, [[-0.0455, 0.61, 0.2], [0.35, 1.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(returns, [[0.4545, 0.81, 1.0], [1.35, 2.0, 0.0]], atol=1e-12)


def test_gae_with_lam_one_is_the_discounted_return_minus_the_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    mask = np.ones((3, 6))
    mask[1, 4:] = 0
    adv, _ = est.gae(rewards, values, mask, gamma=0.8, lam=1.0)
    want = est.discounted_returns(rewards, mask, 0.8) - values * mask
    np.testing.assert_allclose(adv, want, atol=1e-12)


def test_discounted_returns_by_hand():
    # r = [1, 2, 3], gamma 0.5: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75
    got = est.discounted_returns(np.array([[1.0, 2.0, 3.0]]), np.ones((1, 3)), 0.5)
    np.testing.assert_allclose(got, [[2.75, 3.5, 3.0]])


def test_token_rewards_put_the_score_on_the_last_token_and_kl_everywhere():
    # beta 0.1, kl = [0.5, -1, 2] on row 0 (3 tokens), row 1 has 2 tokens
    kl = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 9.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], float)
    got = est.token_rewards(np.array([1.0, -2.0]), mask, kl * mask, beta=0.1)
    np.testing.assert_allclose(got, [[-0.05, 0.1, -0.2 + 1.0], [-0.1, -0.1 - 2.0, 0.0]])


@pytest.mark.parametrize(("estimator", "want"), [
    ("k1", [0.5, -0.25]),                                  # d = old - ref
    ("k2", [0.125, 0.03125]),                              # d^2 / 2
    ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(0.25) - 0.25 - 1]),
])
def test_kl_estimators(estimator, want):
    old, ref = np.array([-1.0, -2.0]), np.array([-1.5, -1.75])
    np.testing.assert_allclose(est.kl_per_token(old, ref, estimator), want, rtol=1e-12)


def test_whiten_uses_the_masked_mean_and_unbiased_variance():
    # masked values 1, 2, 3, 6: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14 / 3
    x = np.array([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = np.array([[1, 1, 0], [1, 1, 0]], float)
    sd = math.sqrt(14 / 3 + 1e-8)
    np.testing.assert_allclose(est.whiten(x, mask),
                               [[-2 / sd, -1 / sd, 0], [0, 3 / sd, 0]], rtol=1e-12)
    np.testing.assert_allclose(est.whiten(x, mask, shift_mean=False),
                               [[-2 / sd + 3, -1 / sd + 3, 0], [3, 3 / sd + 3, 0]], rtol=1e-12)


def test_leave_one_out_by_hand_with_an_unscored_completion():
    # group [1, 0, 0.5, None]: 3 scored. A0 = 1 - (0 + 0.5) / 2 = 0.75, A1 = 0 - 1.5 / 2,
    # A2 = 0.5 - 1 / 2 = 0, the unscored one 0. Group 2 [2, None, None, None]: alone, A = 0.
    total = np.array([1.0, 0.0, 0.5, NAN, 2.0, NAN, NAN, NAN])
    np.testing.assert_allclose(est.leave_one_out(total, 4),
                               [0.75, -0.75, 0.0, 0.0, 0, 0, 0, 0], atol=1e-12)


def test_leave_one_out_estimate_subtracts_the_sequence_kl_and_can_standardise():
    # G = 2, beta 0.5, k1 kl summed over the completion: row 0 kl = 0.2 + 0.2, row 1 0.
    # R = [1 - 0.2, 0] -> A = [0.8, -0.8]; standardised: mean 0, std(ddof 1) = 0.8 sqrt 2.
    rewards = np.array([[1.0], [0.0]])
    mask = np.array([[1, 1], [1, 1]], float)
    old = np.array([[-1.0, -1.0], [-2.0, -2.0]])
    ref = np.array([[-1.2, -1.2], [-2.0, -2.0]])
    c = cfg(advantage_estimator="leave_one_out", num_generations=2, beta=0.5)
    got = est.estimate(c, rewards, np.ones(1), ["r"], mask, old, ref)
    np.testing.assert_allclose(got.advantages, [0.8, -0.8], atol=1e-12)
    assert got.stats["kl"] == pytest.approx(0.1)  # (0.2 * 2 + 0) / 4 tokens
    c.normalize_advantages = True
    got = est.estimate(c, rewards, np.ones(1), ["r"], mask, old, ref)
    sd = 0.8 * math.sqrt(2) + 1e-4
    np.testing.assert_allclose(got.advantages, [0.8 / sd, -0.8 / sd], rtol=1e-12)


def test_global_batch_normalises_returns_over_every_token():
    # G = 1, beta 0: G_t = R on every token. Row 0: R 1 on 2 tokens, row 1: R 0 on 3 tokens.
    # values 1, 1, 0, 0, 0: mean 0.4, unbiased var (2 * 0.36 + 3 * 0.16) / 4 = 0.3.
    rewards = np.array([[1.0], [0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], float)
    got = est.estimate(cfg(advantage_estimator="global_batch"), rewards, np.ones(1), ["r"], mask)
    sd = math.sqrt(0.3 + 1e-8)
    np.testing.assert_allclose(got.advantages, [[0.6 / sd, 0.6 / sd, 0], [-0.4 / sd] * 3],
                               rtol=1e-12)
    assert got.returns is None


def test_global_batch_baseline_subtracts_the_group_mean_first():
    # G = 2, group [1, 0] -> [0.5, -0.5] before normalisation: 4 tokens of +-0.5, mean 0,
    # unbiased var 4 * 0.25 / 3 = 1 / 3.
    rewards = np.array([[1.0], [0.0]])
    mask = np.ones((2, 2))
    c = cfg(advantage_estimator="global_batch", num_generations=2, group_baseline=True)
    got = est.estimate(c, rewards, np.ones(1), ["r"], mask)
    sd = math.sqrt(1 / 3 + 1e-8)
    np.testing.assert_allclose(got.advantages, [[0.5 / sd] * 2, [-0.5 / sd] * 2], rtol=1e-12)


def test_gae_estimate_end_to_end_with_kl_reward_and_whitening():
    # One row, 2 tokens, R = 1, beta 0.1, k1 kl = old - ref = [0.2, -0.4]:
    # r = [-0.02, 0.04 + 1], V = [0.3, 0.6], gamma 1, lam 1:
    # A1 = 1.04 - 0.6 = 0.44, A0 = -0.02 + 0.6 - 0.3 + 0.44 = 0.72; returns [1.02, 1.04]
    mask = np.ones((1, 2))
    old, ref = np.array([[-1.0, -1.0]]), np.array([[-1.2, -0.6]])
    values = np.array([[0.3, 0.6]])
    c = cfg(beta=0.1, lam=1.0)
    got = est.estimate(c, np.array([[1.0]]), np.ones(1), ["r"], mask, old, ref, values)
    np.testing.assert_allclose(got.advantages, [[0.72, 0.44]], atol=1e-12)
    np.testing.assert_allclose(got.returns, [[1.02, 1.04]], atol=1e-12)
    # explained variance: returns [1.02, 1.04] (var 1e-4), residual [0.72, 0.44] (var 0.0196)
    assert got.stats["explained_variance"] == pytest.approx(1 - 0.0196 / 1e-4)
    c.normalize_advantages = True
    got = est.estimate(c, np.array([[1.0]]), np.ones(1), ["r"], mask, old, ref, values)
    sd = math.sqrt(0.0392 + 1e-8)  # unbiased var of [0.72, 0.44]
    np.testing.assert_allclose(got.advantages, [[0.14 / sd, -0.14 / sd]], rtol=1e-12)


def test_unscored_completions_get_zero_advantage_on_token_estimators():
    rewards = np.array([[NAN], [1.0], [0.0]])
    mask = np.ones((3, 2))
    got = est.estimate(cfg(advantage_estimator="global_batch"), rewards, np.ones(1), ["r"], mask)
    assert not got.advantages[0].any() and got.advantages[1:].std() > 0
    # the unscored row enters no statistic: the other two rows are +-1 / sd exactly
    sd = math.sqrt(4 * 0.25 / 3 + 1e-8)
    np.testing.assert_allclose(got.advantages[1:], [[0.5 / sd] * 2, [-0.5 / sd] * 2],
                               rtol=1e-12)


def test_explained_variance():
    returns = np.array([[1.0, 2.0, 3.0]])
    assert est.explained_variance(returns, returns, np.ones((1, 3))) == pytest.approx(1.0)
    assert est.explained_variance(np.zeros((1, 3)), returns, np.ones((1, 3))) == pytest.approx(0)
    assert math.isnan(est.explained_variance(returns, np.ones((1, 3)), np.ones((1, 3))))


def test_high_entropy_mask_keeps_the_top_share():
    from algorithms.rl.prepass import high_entropy_mask

    entropy = np.array([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float)
    # loss-token entropies 0.1 0.9 0.5 0.3 0.7 0.2 0.0: the top ~30% are 0.9 and 0.7
    keep, threshold = high_entropy_mask(entropy, mask, 0.3)
    assert threshold == pytest.approx(np.quantile([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.0], 0.7))
    np.testing.assert_array_equal(keep, [[0, 1, 0, 0], [0, 1, 0, 0]])
