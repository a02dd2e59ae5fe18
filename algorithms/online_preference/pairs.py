"""One generation batch of pairs: sample, score, rank, and lay the pairs out as training rows.

Rollout rows come in pairs ``(2k, 2k + 1)`` for prompt ``k``: the policy's completion first,
then the second one (the policy again for online DPO, the reference for XPO, the geometric
mixture for Nash-MD; ``cfg.second_source``). The reward functions score both (the missing-EOS
penalty included); the first wins ties (TRL's ``>=``); a pair with an unscorable completion
carries no preference (weight 0 in the pair losses, P = 1/2 for Nash-MD).

Micro-batches are cut over PAIRS, never rows (:meth:`PairBatch.micro_batches`): pair ``k`` of a
micro-batch of ``B`` pairs occupies rows ``(j, B + j)``, chosen then rejected, the layout of
offline preference batches (:mod:`algorithms.preference.common`), so sorting by length (to pad
little) can never separate a chosen row from its rejected one. Nash-MD trains on the policy's
completions only (``layout="policy"``): one row per pair, its preference probability beside it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from .. import distributed
from ..rl.batches import RolloutBatch
from ..rl.rollouts import (
    Rollouts,
    gather_share,
    reward_weights,
    round_seed,
    row_seeds,
    sampling_params,
    score,
)

LAYOUTS = ("pairs", "policy")


def pair_rollouts(cfg: Any, backend: Any, stream: Any, scorer: Any, step: int) -> Rollouts:
    """``prompts_per_step`` prompts, two completions each (module docstring), scored. Every
    completion has its own seed (a function of the run seed, the step, which completion of the
    pair and the prompt's place), so it does not depend on how the prompts are batched or which
    rank samples it: distributed, each rank samples and scores its share of the prompts, and
    the pairs and rewards are gathered in rank order."""
    prompts = stream.take(cfg.prompts_per_step)
    examples = [e for e in prompts for _ in range(2)]
    mine = distributed.shard(len(prompts))
    completions, per_function, total, generation, scoring = gather_share(
        *_sample_pairs(cfg, backend, scorer, prompts[mine.start:mine.stop], mine.start, step))
    lengths = np.array([len(c.ids) for c in completions], dtype=np.float64)
    stats = {"completions/mean_length": float(lengths.mean()),
             "completions/max_length": float(lengths.max()),
             "completions/min_length": float(lengths.min()),
             "completions/clipped_ratio": float(np.mean([c.truncated for c in completions])),
             "time/generation": generation, "time/scoring": scoring}
    if cfg.second_source != "policy":
        stats[f"completions/{cfg.second_source}_mean_length"] = float(lengths[1::2].mean())
        stats["completions/policy_mean_length"] = float(lengths[0::2].mean())
    return Rollouts(examples, completions, per_function, reward_weights(cfg, scorer), total,
                    stats)


def _sample_pairs(cfg: Any, backend: Any, scorer: Any, prompts: list, offset: int,
                  step: int) -> tuple[list, dict, np.ndarray, float, float]:
    """The two completions of each of ``prompts`` (prompt ``offset + i`` of the step),
    interleaved ``(first, second)``, their rewards, and the generation and scoring seconds."""
    if not prompts:
        return [], {}, np.zeros(0), 0.0, 0.0
    n = cfg.prompts_per_step
    ids = [e.prompt_ids for e in prompts]
    rows = slice(offset, offset + len(prompts))
    params = sampling_params(cfg)
    start = time.perf_counter()
    first = backend.sample(ids, params, row_seeds(round_seed(cfg.seed, step, 0), n)[rows])
    other = params if cfg.second_source == "policy" else dataclasses.replace(
        params, source=cfg.second_source, mixture_coef=cfg.mixture_weight)
    second = backend.sample(ids, other, row_seeds(round_seed(cfg.seed, step, 1), n)[rows])
    generation = time.perf_counter() - start
    start = time.perf_counter()
    examples = [e for e in prompts for _ in range(2)]
    completions = [c for pair in zip(first, second) for c in pair]
    per_function, total = score(scorer, examples, completions, step, cfg.missing_eos_penalty)
    return completions, per_function, total, generation, time.perf_counter() - start


def rank(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first_wins [P] bool, scored [P] bool)`` from the pair rewards ``total [2P]`` (rows
    ``2k``, ``2k + 1``): the first wins ties; a pair with a NaN reward is not scored."""
    first, second = np.asarray(total[0::2]), np.asarray(total[1::2])
    scored = ~(np.isnan(first) | np.isnan(second))
    return np.where(scored, first >= second, True), scored


def preference(total: np.ndarray) -> np.ndarray:
    """Nash-MD's ``P(first > second) = sigma(r_first - r_second)`` per pair; 1/2 unscored."""
    diff = np.asarray(total[0::2], np.float64) - np.asarray(total[1::2], np.float64)
    return np.where(np.isnan(diff), 0.5, 1.0 / (1.0 + np.exp(-np.nan_to_num(diff))))


class PairBatch:
    """The pairs of one generation batch as training rows (module docstring); ``len`` counts
    pairs, the unit of mini- and micro-batches."""

    def __init__(self, rollouts: Rollouts, pad_id: int, layout: str = "pairs",
                 second_source: str = "policy"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.rollouts, self.layout, self.second_source = rollouts, layout, second_source
        # the loss reads log-probs at temperature 1 (the policy itself), whatever sampled
        self.rows = RolloutBatch(rollouts, mask_truncated=False, temperature=1.0, pad_id=pad_id)
        self.first_wins, self.scored = rank(rollouts.total)
        self.preference = preference(rollouts.total)

    def __len__(self) -> int:
        return len(self.rollouts) // 2

    def chosen_rejected(self, k: int) -> tuple[int, int]:
        """The rows of pair ``k``'s chosen and rejected completions."""
        return (2 * k, 2 * k + 1) if self.first_wins[k] else (2 * k + 1, 2 * k)

    def pair_rows(self, pairs: list[int]) -> list[int]:
        """The rows of ``pairs`` in training order: every chosen row, then the rejected rows in
        the same order (``layout="pairs"``); the policy's rows (``"policy"``)."""
        if self.layout == "policy":
            return [2 * k for k in pairs]
        chosen, rejected = zip(*(self.chosen_rejected(k) for k in pairs))
        return list(chosen) + list(rejected)

    def micro_batches(self, pairs: list[int], batch_size: int, world: Any = None,
                      ) -> list[tuple[list[int], dict[str, np.ndarray]]]:
        """The micro-batches of one optimiser step over ``pairs``: pairs sorted by their longer
        row, cut into ``batch_size`` pairs, each collated with its pair values and its share
        of the step (``micro_fraction``); ``(rows, arrays)`` pairs. With a ``world`` of several
        ranks (every rank holds the same generation batch), this rank's pairs (every
        ``size``-th of the sorted order), padded with empty micro-batches to the count of the
        rank with most (:func:`algorithms.distributed.lockstep`)."""
        seqs = self.rows.sequences
        order = sorted(pairs, key=lambda k: (max(len(seqs[2 * k]), len(seqs[2 * k + 1])), k))
        mine = order if world is None else order[world.rank::world.size]
        out = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            out.append((self.pair_rows(chunk), self._collate(chunk, len(order))))
        if world is not None and world.size > 1:
            template = self._collate(order[:1], len(order))
            for _ in distributed.lockstep(out, world)[len(out):]:
                empty = distributed.empty_like(template)
                empty["micro_fraction"] = np.float32(0.0)
                out.append(([], empty))
        return out

    def _collate(self, chunk: list[int], n_step: int) -> dict[str, np.ndarray]:
        rows = self.pair_rows(chunk)
        arrays = self.rows.collate(rows)
        self._check_paired(rows, len(chunk))
        arrays["pair_weight"] = self.scored[chunk].astype(np.float32)
        arrays["from_second"] = np.array([r % 2 for r in rows], np.float32)
        if self.layout == "policy":
            arrays["preference"] = self.preference[chunk].astype(np.float32)
        arrays["micro_fraction"] = np.float32(len(chunk) / n_step)
        return arrays

    def _check_paired(self, rows: list[int], n_pairs: int) -> None:
        if self.layout != "pairs":
            return
        for j in range(n_pairs):
            a, b = rows[j], rows[n_pairs + j]
            if a // 2 != b // 2:
                raise AssertionError(f"rows {a} and {b} of a micro-batch are not one pair")
