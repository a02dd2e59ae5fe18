"""Advantage estimators: rewards (+ rollout-time log-probs, values) -> advantages, in numpy.

Inputs are completion-aligned: ``N`` completions (groups of ``G`` contiguous), ``C`` token
slots each; ``mask [N, C]`` is 1 on the completion tokens that carry loss, ``R [N]`` the
weighted total reward (NaN = unscorable: its advantages are 0 and it enters no statistic).
``kl_t`` is the per-token KL estimate between the rollout policy and the reference, with
``d = logp_old - logp_ref``: ``k1 = d``, ``k2 = d^2 / 2``, ``k3 = exp(-d) + d - 1``.

Sequence-level (one advantage per completion, broadcast over its tokens); with the KL in the
reward, ``R_i <- R_i - beta sum_t kl_t``:

- ``group`` (GRPO): ``(R_i - mean_group R) / (std + 1e-4)`` (:mod:`algorithms.rl.advantages`).
- ``leave_one_out`` (RLOO): ``A_i = R_i - mean_{j != i} R_j`` over the scored completions of
  the group (0 when no other is scored); optionally standardised over the batch
  (``(A - mean) / (std + 1e-4)``, TRL's ``normalize_advantages``).

Token-level (one advantage per token); per-token rewards ``r_t = -beta kl_t`` (KL in the
reward) plus ``R_i`` at the completion's last loss token ``T``:

- ``global_batch`` (REINFORCE++): ``G_t = sum_{s >= t} gamma^(s - t) r_s``; with
  ``group_baseline`` the group mean of ``R`` is subtracted from ``R`` first; then the returns
  are whitened over every loss token of the batch: ``A = (G - mean) / (std + 1e-8)``.
- ``gae`` (PPO): ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V_{T+1} = 0`` (the episode
  ends at the last token), ``A_t = delta_t + gamma lam A_{t+1}``, returns ``A + V``; the
  advantages are whitened over the batch when asked (PPO always). ``whiten_rewards`` scales the
  per-token rewards by their std first (no mean shift, as TRL).

Whitening (:func:`whiten`): ``(x - mean) / sqrt(var + 1e-8)``, mean and unbiased variance over
the masked entries (TRL's ``masked_whiten``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .advantages import (
    EPS,
    _group_normalise,
    _grouped,
    _nanmean,
    group_advantages,
    reward_stats,
    total_reward,
)

WHITEN_EPS = 1e-8


@dataclasses.dataclass
class Estimate:
    advantages: np.ndarray           # [N] (sequence level) or [N, C] (token level)
    returns: np.ndarray | None       # [N, C] value targets (gae)
    stats: dict[str, float]


def kl_per_token(old_logps: np.ndarray, ref_logps: np.ndarray, estimator: str) -> np.ndarray:
    """Per-token KL estimate of the rollout policy from the reference (module docstring)."""
    d = np.asarray(old_logps, np.float64) - np.asarray(ref_logps, np.float64)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return np.expm1(-d) + d
    raise ValueError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """``(x - mean) / sqrt(var + 1e-8)`` with the mean and unbiased variance of the masked
    entries; ``shift_mean=False`` adds the mean back (unit variance, mean kept); 0 off the
    mask."""
    mask = np.asarray(mask, bool)
    values = x[mask]
    if values.size == 0:
        return np.zeros_like(x)
    mean = values.mean()
    var = values.var(ddof=1) if values.size > 1 else 0.0
    out = (x - mean) / np.sqrt(var + WHITEN_EPS) + (0.0 if shift_mean else mean)
    return np.where(mask, out, 0.0)


def standardise(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``(x - mean) / (std + 1e-4)`` over the kept entries (unbiased std, RLOO's
    ``normalize_advantages``); 0 elsewhere."""
    keep = np.asarray(keep, bool)
    if keep.sum() < 2:
        return np.zeros_like(x)
    values = x[keep]
    return np.where(keep, (x - values.mean()) / (values.std(ddof=1) + EPS), 0.0)


def leave_one_out(total: np.ndarray, num_generations: int) -> np.ndarray:
    """``A_i = R_i - mean_{j != i} R_j`` within each group, NaN-aware: unscored completions get
    0, and so does a completion with no other scored one in its group."""
    grouped = _grouped(np.asarray(total, np.float64), num_generations)
    scored = ~np.isnan(grouped)
    count = scored.sum(axis=1, keepdims=True)
    others = np.nansum(grouped, axis=1, keepdims=True) - np.where(scored, grouped, 0.0)
    baseline = others / np.maximum(count - 1, 1)
    adv = np.where(scored & (count > 1), grouped - baseline, 0.0)
    return adv.reshape(-1)


def last_token(mask: np.ndarray) -> np.ndarray:
    """Index of each row's last masked position (-1 for an empty row)."""
    mask = np.asarray(mask, bool)
    width = mask.shape[1]
    last = width - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, -1)


def token_rewards(total: np.ndarray, mask: np.ndarray, kl: np.ndarray | None,
                  beta: float) -> np.ndarray:
    """``r_t = -beta kl_t`` on the mask (0 without a KL reward), plus ``R`` at the last token."""
    rewards = np.zeros(mask.shape, np.float64) if kl is None else -beta * kl * mask
    rows = np.nonzero(last_token(mask) >= 0)[0]
    rewards[rows, last_token(mask)[rows]] += total[rows]
    return rewards


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma G_{t+1}`` over the masked positions (0 off the mask)."""
    out = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = np.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = np.where(mask[:, t] > 0, running, 0.0)
    return out


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over the masked positions of each row (the next
    value after a row's last masked position is 0); ``(advantages, returns = A + V)``."""
    adv = np.zeros_like(rewards)
    next_value = np.zeros(rewards.shape[0])
    next_adv = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = np.where(on, a, 0.0)
        next_value = np.where(on, values[:, t], next_value)
        next_adv = np.where(on, a, next_adv)
    return adv, np.where(mask > 0, adv + values, 0.0)


def explained_variance(values: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked entries (NaN when the
    returns do not vary)."""
    on = np.asarray(mask, bool)
    var = returns[on].var() if on.any() else 0.0
    if var <= 0:
        return float("nan")
    return float(1.0 - (returns[on] - values[on]).var() / var)


def estimate(cfg: Any, rewards: np.ndarray, weights: np.ndarray, names: list[str],
             mask: np.ndarray, old_logps: np.ndarray | None = None,
             ref_logps: np.ndarray | None = None,
             values: np.ndarray | None = None) -> Estimate:
    """Advantages of one generation batch by ``cfg.advantage_estimator`` (module docstring).
    ``rewards [N, F]`` (NaN = None), ``mask``/``old_logps``/``ref_logps``/``values`` ``[N, C]``.
    """
    g = cfg.num_generations
    stats = reward_stats(rewards, weights, g, names)
    total = total_reward(rewards, weights)
    scored = ~np.isnan(total)
    kl = None
    if cfg.kl_penalty == "reward" and cfg.beta > 0:
        kl = kl_per_token(old_logps, ref_logps, cfg.kl_estimator) * mask
        stats["kl"] = float(kl.sum() / max(mask.sum(), 1.0))
    kind = cfg.advantage_estimator
    returns = None
    if kind in ("group", "leave_one_out"):
        if kl is not None:
            total = total - cfg.beta * kl.sum(axis=1)
        if kind == "group" and cfg.multi_objective_aggregation == "normalize_then_sum":
            adv = group_advantages(rewards, weights, g, cfg.scale_rewards,
                                   cfg.multi_objective_aggregation, names=names)[0]
        elif kind == "group":
            adv = np.nan_to_num(_group_normalise(total, g, cfg.scale_rewards), nan=0.0)
        else:
            adv = leave_one_out(total, g)
            if cfg.normalize_advantages:
                adv = standardise(adv, scored)
    else:
        if kind == "global_batch" and cfg.group_baseline:
            total = total - np.repeat(_nanmean(_grouped(total, g), axis=1)[:, 0], g)
        token_mask = mask * scored[:, None]
        rewards_t = token_rewards(np.nan_to_num(total), token_mask, kl, cfg.beta)
        if kind == "global_batch":
            adv = whiten(discounted_returns(rewards_t, token_mask, cfg.gamma), token_mask)
        elif kind == "gae":
            if cfg.whiten_rewards:
                rewards_t = whiten(rewards_t, token_mask, shift_mean=False)
            adv, returns = gae(rewards_t, values, token_mask, cfg.gamma, cfg.lam)
            stats["values/mean"] = float((values * token_mask).sum() / max(token_mask.sum(), 1))
            stats["returns/mean"] = float((returns * token_mask).sum()
                                          / max(token_mask.sum(), 1))
            stats["explained_variance"] = explained_variance(values, returns, token_mask)
            if cfg.normalize_advantages:
                adv = whiten(adv, token_mask)
        else:
            raise ValueError(f"unknown advantage_estimator {kind!r}")
    stats["advantages/abs_mean"] = float(
        np.abs(adv).mean() if adv.ndim == 1 else np.abs(adv).sum() / max(mask.sum(), 1.0))
    return Estimate(np.asarray(adv, np.float64), returns, stats)
