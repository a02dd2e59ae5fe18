"""One generation batch: sample ``num_generations`` completions per prompt and score them.

DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2) keeps only groups whose rewards are not all
equal (``0 < |{correct o_i}| < G`` for a 0/1 reward): such a group has zero advantage everywhere
and so no policy gradient. Dropped groups are replaced by sampling more prompts until the batch
holds ``prompts_per_step`` informative groups, for at most ``max_sampling_rounds`` rounds; if the
cap is reached the batch is topped up with the most recent dropped groups (advantage 0) so the
step keeps its size, and the counts are logged.

Every completion has its own sampling seed (:func:`row_seeds`: run seed, step, round, row), so
it does not depend on what else is sampled with it. Across processes every rank takes the same
prompts, samples and scores its whole groups (:func:`algorithms.distributed.shard`), and the
completions and rewards are gathered: dynamic sampling, the logs and the estimators see the
whole generation batch, and the result equals one process's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import numpy as np

from .. import distributed
from .advantages import zero_std_groups
from .data import PromptExample, PromptStream
from .sampling import Completion, SamplingParams

MISSING_EOS = "missing_eos_penalty"


@dataclasses.dataclass
class Rollouts:
    """A generation batch, ``N = groups * G`` completions, groups contiguous."""

    examples: list[PromptExample]       # the prompt of each completion (repeated G times)
    completions: list[Completion]
    rewards: dict[str, np.ndarray]      # reward column name -> [N], NaN = not applicable
    weights: dict[str, float]           # reward column name -> weight in the total
    total: np.ndarray                   # weighted total reward [N]
    stats: dict[str, float]             # logged with the step

    def __len__(self) -> int:
        return len(self.completions)

    def reward_matrix(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``rewards [N, F]``, ``weights [F]`` and the column names, in one order."""
        names = list(self.rewards)
        return (np.stack([self.rewards[n] for n in names], axis=1),
                np.array([self.weights[n] for n in names]), names)


def sampling_params(cfg: Any) -> SamplingParams:
    return SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                          stop=tuple(cfg.stop), batch_size=cfg.rollout_batch_size)


def round_seed(seed: int, step: int, round_index: int) -> int:
    """The sampling seed of one generation round: a function of (run seed, step, round), so a
    resumed run samples what an uninterrupted one would."""
    digest = hashlib.sha256(f"rollout:{seed}:{step}:{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def row_seeds(seed: int, n: int) -> list[int]:
    """The sampling seed of each of ``n`` rows sampled with round seed ``seed``."""
    return [int.from_bytes(hashlib.sha256(f"row:{seed}:{i}".encode()).digest()[:4], "little")
            for i in range(n)]


def sample_and_score(cfg: Any, backend: Any, scorer: Any, examples: list[PromptExample],
                     group: int, seed: int, step: int,
                     ) -> tuple[list[Completion], dict[str, np.ndarray], np.ndarray, float]:
    """Sample and score ``examples`` (whole groups of ``group`` rows), each row with its own
    seed: distributed, this rank's groups only, then gathered in rank order. Also the slowest
    rank's generation seconds."""
    seeds = row_seeds(seed, len(examples))
    groups = distributed.shard(len(examples) // group)
    rows = slice(groups.start * group, groups.stop * group)
    start = time.perf_counter()
    completions = backend.sample([e.prompt_ids for e in examples[rows]], sampling_params(cfg),
                                 seeds[rows]) if groups else []
    seconds = time.perf_counter() - start
    per_function, total = score(scorer, examples[rows], completions, step,
                                cfg.missing_eos_penalty) if groups else ({}, np.zeros(0))
    return gather_share(completions, per_function, total, seconds)


def gather_share(completions: list[Completion], per_function: dict[str, np.ndarray],
                 total: np.ndarray, *seconds: float) -> tuple:
    """Every rank's sampled and scored share, in rank order (ranks with none left out), and
    the slowest rank's value of each ``seconds``; as given in one process."""
    world = distributed.current()
    if world.size == 1:
        return (completions, per_function, total, *seconds)
    parts = world.gather((completions, per_function, total, seconds))
    scored = [p for p in parts if len(p[0])]
    return ([c for p in scored for c in p[0]],
            {k: np.concatenate([p[1][k] for p in scored]) for k in scored[0][1]},
            np.concatenate([p[2] for p in scored]),
            *(max(p[3][i] for p in parts) for i in range(len(seconds))))


def reward_view(example: PromptExample, completion: Completion) -> Any:
    """The completion as reward functions see it: text for a string prompt, an assistant
    message list for a conversational one (as TRL passes them)."""
    if isinstance(example.prompt, list):
        return [{"role": "assistant", "content": completion.text}]
    return completion.text


def score(scorer: Any, examples: list[PromptExample], completions: list[Completion],
          step: int, missing_eos_penalty: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reward columns by name and the weighted total of each completion. With a
    ``missing_eos_penalty`` a column of that name holds ``-penalty`` for completions that hit
    the length limit (0 for the others, NaN where no function scored the sample, which stays
    unscorable), and the total includes it."""
    columns = {key: [e.columns[key] for e in examples] for key in examples[0].columns}
    scores = scorer.score([e.prompt for e in examples],
                          [reward_view(e, c) for e, c in zip(examples, completions)],
                          [c.ids for c in completions], step=step, columns=columns)
    per_function, total = dict(scores.per_function), scores.total
    if missing_eos_penalty:
        truncated = np.array([c.truncated for c in completions])
        column = np.where(np.isnan(total), np.nan, np.where(truncated, -missing_eos_penalty, 0.0))
        per_function[MISSING_EOS] = column
        total = total + np.nan_to_num(column)
    return per_function, total


def reward_weights(cfg: Any, scorer: Any) -> dict[str, float]:
    """Weight of every reward column (the penalty column counts once)."""
    weights = dict(zip(scorer.names, (float(w) for w in scorer.weights)))
    if cfg.missing_eos_penalty:
        weights[MISSING_EOS] = 1.0
    return weights


@dataclasses.dataclass
class _Group:
    examples: list[PromptExample]
    completions: list[Completion]
    rewards: dict[str, np.ndarray]
    total: np.ndarray


def generate(cfg: Any, backend: Any, stream: PromptStream, scorer: Any, step: int) -> Rollouts:
    """Sample, score and normalise one generation batch (see the module docstring)."""
    g, wanted = cfg.num_generations, cfg.prompts_per_step
    kept: list[_Group] = []
    dropped: list[_Group] = []
    rounds, sampled_groups, flat_groups = 0, 0, 0
    seconds = {"generation": 0.0, "scoring": 0.0}
    max_rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    while len(kept) < wanted and rounds < max_rounds:
        prompts = stream.take(wanted - len(kept))
        examples = [e for e in prompts for _ in range(g)]
        start = time.perf_counter()
        completions, per_function, total, generating = sample_and_score(
            cfg, backend, scorer, examples, g, round_seed(cfg.seed, step, rounds), step)
        seconds["generation"] += generating
        seconds["scoring"] += time.perf_counter() - start - generating
        flat = zero_std_groups(total, g)
        flat_groups += int(np.sum(flat))
        for i in range(len(prompts)):
            rows = slice(i * g, (i + 1) * g)
            group = _Group(examples[rows], completions[rows],
                           {k: v[rows] for k, v in per_function.items()}, total[rows])
            (dropped if cfg.dynamic_sampling and flat[i] else kept).append(group)
        rounds += 1
        sampled_groups += len(prompts)
    topped_up = 0
    while len(kept) < wanted and dropped:
        kept.append(dropped.pop())
        topped_up += 1
    rewards = {k: np.concatenate([grp.rewards[k] for grp in kept]) for k in kept[0].rewards}
    total = np.concatenate([grp.total for grp in kept])
    completions = [c for grp in kept for c in grp.completions]
    lengths = np.array([len(c.ids) for c in completions], dtype=np.float64)
    stats = {
        # over every group sampled this step, before dynamic sampling dropped any
        "frac_reward_zero_std": flat_groups / sampled_groups,
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/min_length": float(lengths.min()),
        "completions/clipped_ratio": float(np.mean([c.truncated for c in completions])),
        "time/generation": seconds["generation"], "time/scoring": seconds["scoring"],
    }
    if cfg.dynamic_sampling:
        stats.update({"dynamic_sampling/rounds": float(rounds),
                      "dynamic_sampling/sampled_groups": float(sampled_groups),
                      "dynamic_sampling/dropped_groups": float(sampled_groups - len(kept)
                                                               + topped_up),
                      "dynamic_sampling/topped_up_groups": float(topped_up)})
    return Rollouts([e for grp in kept for e in grp.examples], completions, rewards,
                    reward_weights(cfg, scorer), total, stats)

