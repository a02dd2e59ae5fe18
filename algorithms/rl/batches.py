"""A generation batch as training rows, in the layout of :mod:`algorithms.backend`.

Each completion becomes one row ``prompt_ids + completion_ids`` whose loss mask covers the
completion tokens (including the EOS it ended on). With ``mask_truncated_completions`` (DAPO's
overlong filtering) a completion that hit ``max_completion_length`` gets an all-zero mask: no
loss, though its reward still entered the statistics.

Per-completion values live beside the rows, completion-aligned: ``row_values[key]`` ``[N]``
(sequence-level advantages) and ``token_values[key]`` ``[N, C]`` (rollout-time log-probs,
values, token-level advantages, returns, the entropy mask), slot ``j`` of row ``i`` being the
``j``-th completion token. :meth:`RolloutBatch.collate` places them at the positions that
predict those tokens, so any set of rows (a shuffled mini-batch, a micro-batch) can be cut
from the batch at any time; :meth:`RolloutBatch.store` takes a forward pass's ``[B, T]``
outputs back into completion slots.

Micro-batches keep the completions of a prompt together (the padding-free paths of both
backends then compute the shared prompt once: :mod:`algorithms.data.prefix_tree`), rows sorted
by length within a prompt's group; every loss aggregation is a sum over micro-batches, so the
order changes nothing else. Keys added for the
loss: ``temperature`` (outputs under the sampling distribution), ``num_items`` (loss tokens of
the optimiser step) and ``micro_fraction`` (this micro-batch's share of the step's rows). Across
processes each rank takes a contiguous share of that order (so a prompt's completions mostly
stay on one rank), the counts stay the whole step's, and every rank makes as many
micro-batches (empty ones where it has no rows left).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np

from .. import distributed
from ..data.batching import Batch, collate
from .rollouts import Rollouts


@dataclasses.dataclass
class _Sequence:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class RolloutBatch:
    """The rows of one generation batch and the per-completion values computed for them."""

    def __init__(self, rollouts: Rollouts, mask_truncated: bool, temperature: float,
                 pad_id: int):
        self.rollouts, self.temperature, self.pad_id = rollouts, temperature, pad_id
        self.sequences: list[_Sequence] = []
        for example, completion in zip(rollouts.examples, rollouts.completions):
            keep = 0 if (mask_truncated and completion.truncated) else 1
            self.sequences.append(_Sequence(
                list(example.prompt_ids) + list(completion.ids),
                [0] * len(example.prompt_ids) + [keep] * len(completion.ids)))
        # the position predicting the first completion token, and each completion's length
        self.starts = np.array([len(e.prompt_ids) - 1 for e in rollouts.examples])
        self.lengths = np.array([len(c.ids) for c in rollouts.completions])
        width = int(self.lengths.max(initial=0))
        self.completion_mask = np.zeros((len(self), width), np.float32)
        for i, seq in enumerate(self.sequences):
            self.completion_mask[i, :self.lengths[i]] = seq.loss_mask[self.starts[i] + 1:]
        self.row_values: dict[str, np.ndarray] = {}
        self.token_values: dict[str, np.ndarray] = {}
        self._dataset = types.SimpleNamespace(examples=self.sequences, pad_id=pad_id)

    def __len__(self) -> int:
        return len(self.sequences)

    def collate(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The ``[B, T]`` arrays of ``rows`` (in that order), with every stored value placed."""
        arrays = collate(self._dataset, Batch(tuple((i,) for i in rows)), self.pad_id)
        for key, values in self.row_values.items():
            arrays[key] = values[rows].astype(np.float32)
        width = arrays["input_ids"].shape[1]
        for key, values in self.token_values.items():
            placed = np.zeros((len(rows), width), np.float32)
            for r, i in enumerate(rows):
                s, n = self.starts[i], self.lengths[i]
                placed[r, s:s + n] = values[i, :n]
            arrays[key] = placed
        arrays["temperature"] = np.float32(self.temperature)
        return arrays

    def store(self, key: str, rows: list[int], values: np.ndarray) -> None:
        """Keep ``values [len(rows), T]`` (a forward output) in the completion slots."""
        table = self.token_values.setdefault(
            key, np.zeros(self.completion_mask.shape, np.float64))
        for r, i in enumerate(rows):
            s, n = self.starts[i], self.lengths[i]
            table[i, :n] = values[r, s:s + n]

    def micro_batches(self, rows: list[int], batch_size: int, world: Any = None,
                      ) -> list[tuple[list[int], dict[str, np.ndarray]]]:
        """The micro-batches of one optimiser step over ``rows``: the rows of one prompt
        together (the padding-free paths then run their prompt once), sorted by length inside,
        groups by their shortest row; cut into ``batch_size`` rows, each with the step's
        ``num_items`` and its ``micro_fraction``; ``(rows of the micro-batch, arrays)`` pairs.
        With a ``world`` of several ranks, this rank's share of them (module docstring)."""
        by_prompt: dict[tuple, list[int]] = {}
        for i in rows:
            by_prompt.setdefault(tuple(self.rollouts.examples[i].prompt_ids), []).append(i)
        groups = [sorted(g, key=lambda i: (len(self.sequences[i]), i))
                  for g in by_prompt.values()]
        groups.sort(key=lambda g: (len(self.sequences[g[0]]), g[0]))
        order = [i for g in groups for i in g]
        num_items = max(1.0, float(sum(sum(self.sequences[i].loss_mask) for i in rows)))
        share = range(len(order)) if world is None else distributed.shard(len(order), world)
        mine = order[share.start:share.stop]
        out = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            arrays = self.collate(chunk)
            arrays["num_items"] = np.float32(num_items)
            arrays["micro_fraction"] = np.float32(len(chunk) / len(order))
            out.append((chunk, arrays))
        if world is not None and world.size > 1:
            template = self.collate(order[:1]) if order else None
            for _ in distributed.lockstep(out, world)[len(out):]:
                empty = distributed.empty_like(template)
                empty.update(num_items=np.float32(num_items), micro_fraction=np.float32(0.0),
                             temperature=np.float32(self.temperature))
                out.append(([], empty))
        return out


def mini_batches(n_rows: int, cfg: Any, generation_step: int) -> list[list[int]]:
    """The row sets of the ``steps_per_generation`` optimiser steps of one generation batch:
    ``num_iterations`` passes, each a fresh seeded shuffle cut into ``num_mini_batches`` (one
    pass over all rows in order when there is a single mini-batch)."""
    steps = []
    for epoch in range(cfg.num_iterations):
        if cfg.num_mini_batches == 1:
            steps.append(list(range(n_rows)))
            continue
        rng = np.random.default_rng([cfg.seed, generation_step, epoch])
        for part in np.array_split(rng.permutation(n_rows), cfg.num_mini_batches):
            steps.append([int(i) for i in part])
    return steps
