"""Between sampling and the update: the no-grad passes over a generation batch and the
advantage estimate.

What runs depends on the options, never on the algorithm's name:

- the policy, once, for the outputs someone needs: ``logps`` when the update is off-policy
  (``old_per_token_logps``: ``num_iterations`` or ``num_mini_batches`` > 1) or the KL goes in
  the reward; ``values`` for GAE (``old_values``); ``entropy`` for ``top_entropy_quantile``;
- the reference, for ``logps``, when ``beta`` > 0 (``ref_per_token_logps`` for a KL loss term);
- then the estimator (:mod:`algorithms.rl.estimators`) turns rewards (+ those arrays) into
  advantages (and returns), stored in the batch for the update.

Every pass runs at the sampling temperature, in micro-batches of ``--batch-size`` rows sorted
by length. Across processes each rank runs its share of the rows and the per-token results are
added up over ranks (each row is computed by one rank, zeros elsewhere), so every rank runs the
estimator on the whole batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import distributed
from ..backend import with_head_mask
from .batches import RolloutBatch
from .estimators import estimate
from .rollouts import Rollouts


def policy_outputs(cfg: Any) -> tuple[str, ...]:
    """The policy outputs the rollout-time pass computes (may be empty)."""
    wanted = []
    if cfg.off_policy or (cfg.kl_penalty == "reward" and cfg.beta > 0):
        wanted.append("logps")
    if cfg.uses_value_head:
        wanted.append("values")
    if cfg.top_entropy_quantile < 1:
        wanted.append("entropy")
    return tuple(wanted)


def prepare_batch(cfg: Any, backend: Any, rollouts: Rollouts,
                  pad_id: int) -> tuple[RolloutBatch, dict[str, float]]:
    """The generation batch as training rows with everything the update reads; its stats."""
    start = time.perf_counter()
    batch = RolloutBatch(rollouts, cfg.mask_truncated_completions, cfg.temperature, pad_id)
    world = distributed.current()
    rows = list(distributed.shard(len(batch), world))
    wanted = policy_outputs(cfg)
    passes = batch.micro_batches(rows, cfg.batch_size)
    for item in distributed.lockstep(passes, world):
        micro_rows, arrays = item if item is not None else ([], distributed.empty_like(None))
        read = with_head_mask(arrays, "loss_mask")  # only the completions are read
        if wanted:
            for name, values in backend.forward(read, wanted).items():
                batch.store(name, micro_rows, values)
        if cfg.beta > 0:
            batch.store("ref", micro_rows, backend.reference_per_token_logps(read))
    if world.size > 1:  # each row from the rank that computed it
        for key in (*wanted, *(("ref",) if cfg.beta > 0 else ())):
            table = batch.token_values.get(key, np.zeros(batch.completion_mask.shape))
            batch.token_values[key] = world.all_sum(table)
    found = batch.token_values
    old, ref = found.pop("logps", None), found.pop("ref", None)
    values, entropy = found.pop("values", None), found.pop("entropy", None)
    rewards, weights, names = rollouts.reward_matrix()
    result = estimate(cfg, rewards, weights, names, batch.completion_mask, old, ref, values)
    if result.advantages.ndim == 1:
        batch.row_values["advantages"] = result.advantages
    else:
        batch.token_values["advantages"] = result.advantages
    if cfg.off_policy:
        batch.token_values["old_per_token_logps"] = old
    if cfg.beta > 0 and cfg.kl_penalty == "loss":
        batch.token_values["ref_per_token_logps"] = ref
    if values is not None:
        batch.token_values["old_values"] = values
        batch.token_values["returns"] = result.returns
    stats = {**result.stats, **rollouts.stats}
    if entropy is not None:
        keep, threshold = high_entropy_mask(entropy, batch.completion_mask,
                                            cfg.top_entropy_quantile)
        batch.token_values["entropy_mask"] = keep
        stats["entropy/threshold"] = threshold
    stats["time/logps"] = time.perf_counter() - start
    generated = sum(len(c.ids) for c in rollouts.completions)
    stats["generation/tokens_per_second"] = generated / max(stats["time/generation"], 1e-9)
    return batch, stats


def high_entropy_mask(entropy: np.ndarray, mask: np.ndarray,
                      quantile: float) -> tuple[np.ndarray, float]:
    """1 on the loss tokens whose entropy is at least the ``1 - quantile`` quantile of the
    batch's loss-token entropies (the top ``quantile`` share; Wang et al. 2025), and that
    threshold."""
    on = np.asarray(mask) > 0
    if not on.any():
        return np.zeros_like(entropy), float("nan")
    threshold = float(np.quantile(entropy[on], 1.0 - quantile))
    return ((entropy >= threshold) & on).astype(np.float64), threshold
