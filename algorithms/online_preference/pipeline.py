"""The online loop's pipeline for online DPO, XPO and Nash-MD (:func:`algorithms.rl.trainer.
train` runs it): sample and score pairs, rank them, the reference's log-probs of every row the
loss reads (one no-grad pass), the statistics their users watch, and the samples written to
``<run_dir>/completions.jsonl``.

Logged once per generation batch: the reward functions' statistics (``reward``,
``rewards/<fn>/mean`` ...), ``scores/chosen`` / ``scores/rejected`` / ``scores/margin`` (the
reward of the chosen and rejected completions; for Nash-MD the policy's and the mixture's), the
win rate of the policy's completion over the second one (XPO: over the reference's; Nash-MD:
over the mixture's; ties count one half), ``pairs/unscored``, completion lengths and EOS rates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import with_head_mask
from ..rl.advantages import nan_mean_std
from ..rl.rollouts import reward_view
from ..rl.scoring import build_scorer
from ..rl.trainer import evaluate_rewards
from .pairs import PairBatch, pair_rollouts


class PairPipeline:
    """See the module docstring; ``layout`` is :class:`PairBatch`'s."""

    def __init__(self, layout: str = "pairs") -> None:
        self.layout = layout

    def scorer(self, cfg: Any, data: Any, backend: Any) -> Any:
        return build_scorer(cfg, data.extras["rewards"], backend)

    def rollout(self, cfg: Any, backend: Any, stream: Any, scorer: Any, step: int,
                pad_id: int) -> tuple[PairBatch, dict[str, float]]:
        rollouts = pair_rollouts(cfg, backend, stream, scorer, step)
        start = time.perf_counter()
        batch = PairBatch(rollouts, pad_id, self.layout, cfg.second_source)
        for rows, arrays in batch.micro_batches(list(range(len(batch))), cfg.batch_size):
            batch.rows.store("ref_per_token_logps", rows, backend.reference_per_token_logps(
                with_head_mask(arrays, "loss_mask")))  # read on the completions only
        stats = {**pair_stats(batch, cfg), **rollouts.stats,
                 "time/logps": time.perf_counter() - start}
        generated = sum(len(c.ids) for c in rollouts.completions)
        stats["generation/tokens_per_second"] = generated / max(stats["time/generation"], 1e-9)
        return batch, stats

    def write_samples(self, cfg: Any, run_dir: Path, step: int, batch: PairBatch) -> None:
        write_pairs(run_dir, step, batch)

    def evaluate(self, cfg: Any, backend: Any, dataset: Any, scorer: Any, step: int) -> dict:
        return evaluate_rewards(cfg, backend, dataset, scorer, step)


def pair_stats(batch: PairBatch, cfg: Any) -> dict[str, float]:
    """The rollout statistics of the module docstring."""
    rollouts = batch.rollouts
    total = rollouts.total
    mean, std = nan_mean_std(total)
    stats = {"reward": mean, "reward_std": std}
    for name, values in rollouts.rewards.items():
        stats[f"rewards/{name}/mean"] = nan_mean_std(values)[0]
    first, second = total[0::2], total[1::2]
    scored = batch.scored
    stats["pairs/unscored"] = float(np.mean(~scored))
    if batch.layout == "policy" or cfg.second_source != "policy":
        label_a, label_b = "policy", cfg.second_source
    else:
        label_a, label_b = "chosen", "rejected"
    if scored.any():
        a, b = first[scored], second[scored]
        if label_a == "chosen":
            a, b = np.maximum(a, b), np.minimum(a, b)
        stats[f"scores/{label_a}"] = float(a.mean())
        stats[f"scores/{label_b}"] = float(b.mean())
        stats["scores/margin"] = float((a - b).mean())
        if label_a == "policy":
            stats["win_rate"] = float(np.mean((a > b) + 0.5 * (a == b)))
    if batch.layout == "policy":
        stats["preference/mean"] = float(batch.preference.mean())
    eos = np.array([c.finish_reason != "length" for c in rollouts.completions])
    stats["completions/eos_ratio"] = float(eos.mean())
    return stats


def write_pairs(run_dir: Path, step: int, batch: PairBatch, n_pairs: int = 2) -> None:
    """Append the first ``n_pairs`` pairs to ``<run_dir>/completions.jsonl``: one line per
    completion (prompt, completion, rewards, which model sampled it, whether it was chosen, or
    Nash-MD's preference probability of the policy's completion)."""
    rollouts = batch.rollouts
    with open(Path(run_dir) / "completions.jsonl", "a") as handle:
        for k in range(min(len(batch), n_pairs)):
            chosen, _ = batch.chosen_rejected(k)
            for i in (2 * k, 2 * k + 1):
                example, completion = rollouts.examples[i], rollouts.completions[i]
                record = {
                    "step": step, "pair": k, "source": example.source, "prompt": example.prompt,
                    "completion": reward_view(example, completion),
                    "sampled_from": "policy" if i % 2 == 0 else batch.second_source,
                    "finish_reason": completion.finish_reason,
                    "rewards": {n: _json(v[i]) for n, v in rollouts.rewards.items()},
                    "reward": _json(rollouts.total[i]),
                }
                if batch.layout == "policy":
                    record["preference"] = float(batch.preference[k])
                else:
                    record["chosen"] = bool(i == chosen and batch.scored[k])
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _json(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
