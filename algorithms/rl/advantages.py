"""Rewards -> advantages for the GRPO family (docs/ALGORITHMS.md section 8), in numpy.

A generation batch holds ``N = groups x G`` completions, each group's ``G`` rows contiguous.
``rewards[N, F]`` holds one column per reward function, NaN where a function returned None
(not applicable). With weights ``w_f`` and ``eps = 1e-4``:

sum_then_normalize (GRPO, DeepSeekMath; the default)::

    R_i   = sum_f w_f r_if over the non-NaN r_if     (NaN when every r_if is NaN: unscorable)
    mu_g  = nanmean of R over the group g of i
    sigma = nanstd(R, ddof=1) over the group g      scale_rewards="group"
          = nanstd(R, ddof=1) over the whole batch   scale_rewards="batch" (PPO-Lite)
    A_i   = (R_i - mu_g) / (sigma + eps)             or R_i - mu_g for "none" (Dr. GRPO)

normalize_then_sum (GDPO, arXiv 2601.05242)::

    Ahat_if = (r_if - mu_g(r_f)) / (std_g(r_f, ddof=1) + eps)     per function, per group
    R_i     = sum_f w_f Ahat_if over the non-NaN Ahat_if          (NaN when all are NaN)
    A_i     = (R_i - nanmean_batch R) / (nanstd_batch(R, ddof=1) + eps)

Finally ``A = nan_to_num(A, 0)``: an unscorable completion gets advantage 0. A std over fewer
than two values (Bessel's correction is undefined) counts as 0, so a lone scored completion in
its group gets ``A = 0 / eps = 0``. No numpy warnings are raised for empty or all-NaN groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-4
ZERO_STD_ATOL = 1e-8  # rewards closer than this count as equal (torch.isclose's default atol)


def _grouped(x: np.ndarray, num_generations: int) -> np.ndarray:
    """``x[N, ...]`` as ``[N / G, G, ...]``; raises when N is not a multiple of G."""
    n = x.shape[0]
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if n % num_generations:
        raise ValueError(f"{n} completions is not a whole number of groups of "
                         f"num_generations={num_generations}; the rollout must sample G "
                         f"completions for every prompt")
    return x.reshape(n // num_generations, num_generations, *x.shape[1:])


def _nanmean(x: np.ndarray, axis: int, keepdims: bool = True) -> np.ndarray:
    """nanmean without the 'mean of empty slice' warning: NaN where no value is present."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    total = np.nansum(x, axis=axis, keepdims=keepdims)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanstd(x: np.ndarray, axis: int, keepdims: bool = True) -> np.ndarray:
    """Unbiased (ddof=1) nanstd; 0 where fewer than two values are present."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
    centred = x - _nanmean(x, axis, keepdims=True)
    sq = np.nansum(np.square(centred), axis=axis, keepdims=keepdims)
    return np.where(count > 1, np.sqrt(sq / np.maximum(count - 1, 1)), 0.0)


def _nansum_or_nan(x: np.ndarray, axis: int) -> np.ndarray:
    """nansum over ``axis``, NaN where every value is NaN (nansum alone would give 0)."""
    return np.where(np.isnan(x).all(axis=axis), np.nan, np.nansum(x, axis=axis))


def _group_normalise(values: np.ndarray, num_generations: int, scale: str) -> np.ndarray:
    """``values[N]`` minus their group's mean, divided by the group / batch std (+ eps)."""
    grouped = _grouped(values, num_generations)                   # [groups, G]
    centred = (grouped - _nanmean(grouped, axis=1)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = np.repeat(_nanstd(grouped, axis=1)[:, 0], num_generations)
    elif scale == "batch":
        std = _nanstd(values, axis=0)
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return centred / (std + EPS)


def zero_std_groups(total_rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """``bool[N / G]``: True for groups whose rewards are all equal (NaN ignored; a group with
    fewer than two scored completions counts as equal). Such a group has advantage 0 for every
    completion, hence no policy gradient: DAPO's dynamic sampling drops it."""
    grouped = _grouped(np.asarray(total_rewards, dtype=np.float64), num_generations)
    present = ~np.isnan(grouped)
    high = np.where(present, grouped, -np.inf).max(axis=1)
    low = np.where(present, grouped, np.inf).min(axis=1)
    return (present.sum(axis=1) < 2) | (high - low <= ZERO_STD_ATOL)


def group_advantages(rewards: np.ndarray, weights: Sequence[float] | np.ndarray,
                     num_generations: int, scale_rewards: str = "group",
                     aggregation: str = "sum_then_normalize",
                     names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages ``[N]`` (float64) from ``rewards[N, F]`` (NaN = None); see the module docstring.

    ``scale_rewards`` applies to sum_then_normalize only (normalize_then_sum always divides by
    the std). Stats (floats): ``rewards/<name>/mean`` and ``/std`` per function (``names``, or
    ``func_<f>``), ``reward`` and ``reward_std`` of the weighted total, population std over the
    non-NaN values, NaN when none; ``frac_reward_zero_std``, the share of groups whose totals are
    all equal; ``advantages/abs_mean``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, F] (one column per reward function), "
                         f"got shape {rewards.shape}")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != rewards.shape[1]:
        raise ValueError(f"{w.shape[0]} reward weights for {rewards.shape[1]} reward functions")
    _grouped(rewards, num_generations)  # checks N % G before any work
    total = total_reward(rewards, w)
    if aggregation == "sum_then_normalize":
        adv = _group_normalise(total, num_generations, scale_rewards)
    elif aggregation == "normalize_then_sum":
        per_func = np.stack([_group_normalise(rewards[:, f], num_generations, "group")
                             for f in range(rewards.shape[1])], axis=1)
        summed = _nansum_or_nan(per_func * w, axis=1)
        adv = (summed - _nanmean(summed, axis=0)) / (_nanstd(summed, axis=0) + EPS)
    else:
        raise ValueError(f"multi_objective_aggregation must be sum_then_normalize or "
                         f"normalize_then_sum, got {aggregation!r}")
    adv = np.nan_to_num(adv, nan=0.0)
    stats = reward_stats(rewards, w, num_generations, names)
    stats["advantages/abs_mean"] = float(np.mean(np.abs(adv)))
    return adv, stats


def total_reward(rewards: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``R_i = sum_f w_f r_if`` over the non-NaN ``r_if``; NaN where every function returned
    None (an unscorable completion)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    return _nansum_or_nan(rewards * w, axis=1)


def reward_stats(rewards: np.ndarray, weights: Sequence[float] | np.ndarray,
                 num_generations: int, names: Sequence[str] | None = None) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``/std`` per function (``names``, or ``func_<f>``),
    ``reward`` and ``reward_std`` of the weighted total (population std over the non-NaN
    values, NaN when none) and ``frac_reward_zero_std``, the share of groups whose totals are
    all equal."""
    rewards = np.asarray(rewards, dtype=np.float64)
    names = list(names) if names is not None else [f"func_{f}" for f in range(rewards.shape[1])]
    if len(names) != rewards.shape[1]:
        raise ValueError(f"{len(names)} names for {rewards.shape[1]} reward functions")
    total = total_reward(rewards, weights)
    stats: dict[str, float] = {}
    for name, column in zip(names, rewards.T):
        stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = nan_mean_std(column)
    stats["reward"], stats["reward_std"] = nan_mean_std(total)
    stats["frac_reward_zero_std"] = float(np.mean(zero_std_groups(total, num_generations)))
    return stats


def nan_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population std of the non-NaN values (NaN, NaN when there are none)."""
    finite = values[~np.isnan(values)]
    if not finite.size:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std())
