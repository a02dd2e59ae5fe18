"""Training micro-batches from a generation batch, in the layout of :mod:`algorithms.backend`.

Each completion becomes one row ``prompt_ids + completion_ids`` whose loss mask covers the
completion tokens (including the EOS it ended on). With ``mask_truncated_completions`` (DAPO's
overlong filtering) a completion that hit ``max_completion_length`` gets an all-zero mask: no
loss, though its reward still entered the group statistics. Rows are sorted by length before
they are cut into micro-batches of ``batch_size`` completions, so little compute goes to padding;
every loss aggregation is a sum over micro-batches, so the order changes nothing else.

Keys added for the policy loss (:mod:`algorithms.rl.policy_loss`): ``advantages`` [B],
``temperature`` (log-probs under the sampling distribution), ``num_items`` (loss tokens of the
whole generation batch) and ``micro_fraction`` (this micro-batch's share of the rows).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np

from ..data.batching import Batch, collate
from .rollouts import Rollouts


@dataclasses.dataclass
class _Sequence:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def sequences(rollouts: Rollouts, mask_truncated: bool) -> list[_Sequence]:
    out = []
    for example, completion in zip(rollouts.examples, rollouts.completions):
        keep = 0 if (mask_truncated and completion.truncated) else 1
        out.append(_Sequence(list(example.prompt_ids) + list(completion.ids),
                             [0] * len(example.prompt_ids) + [keep] * len(completion.ids)))
    return out


def micro_batches(rollouts: Rollouts, cfg: Any, pad_id: int) -> list[dict[str, np.ndarray]]:
    """The arrays of every micro-batch of one optimiser step (the whole generation batch)."""
    seqs = sequences(rollouts, cfg.mask_truncated_completions)
    dataset = types.SimpleNamespace(examples=seqs, pad_id=pad_id)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    num_items = max(1.0, float(sum(sum(s.loss_mask) for s in seqs)))
    out = []
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        arrays = collate(dataset, Batch(tuple((i,) for i in rows)), pad_id)
        arrays["advantages"] = rollouts.advantages[rows].astype(np.float32)
        arrays["temperature"] = np.float32(cfg.temperature)
        arrays["num_items"] = np.float32(num_items)
        arrays["micro_fraction"] = np.float32(len(rows) / len(order))
        out.append(arrays)
    return out
