"""Batches: which examples go together (a pure function of seed and epoch) and their arrays.

A micro-batch is a :class:`Batch` of ROWS, each row a tuple of example indices laid end to end:

- padding mode (``packing=False``): every row holds one example; each epoch the examples are
  shuffled by ``(seed, epoch)`` and cut into batches of ``batch_size`` rows (the last batch may
  be smaller; nothing is dropped).
- packing mode: rows are built ONCE by best-fit decreasing (examples sorted by length, longest
  first, ties by index; each goes into the open row with the least room that still fits it,
  else a new row of capacity ``max_length``). Examples are never split. Each epoch the rows are
  shuffled by ``(seed, epoch)`` and cut into batches of ``batch_size`` rows.

``collate`` turns a Batch into the numpy layout of :mod:`algorithms.backend`, right-padded to the
longest row of the batch. For a document ``x_0 .. x_{L-1}`` placed at offset ``o`` of a row:

    input_ids[o + t]   = x_t                        t = 0 .. L-1
    targets[o + t]     = x_{t+1}, loss_mask = m_{t+1}   t = 0 .. L-2
    targets[o + L - 1] = pad_id,  loss_mask = 0     (nothing is predicted across documents)
    segment_ids[o + t] = its 1-based position in the row; padding is 0 with pad_id / mask 0.

so ``loss_mask.sum()`` is the number of loss tokens of the micro-batch (what the loop adds up
into ``num_items``).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One micro-batch: ``rows[r]`` lists the example indices laid end to end in row ``r``."""

    rows: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def indices(self) -> list[int]:
        """Every example index in the batch, row by row."""
        return [i for row in self.rows for i in row]


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[tuple[int, ...]]:
    """Rows of example indices, each row's total length <= ``capacity`` (see module doc)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row id), sorted: best fit = first that fits
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens, more than the row size {capacity}")
        k = bisect.bisect_left(room, (need, -1))
        if k == len(room):
            rows.append([i])
            free, row_id = capacity - need, len(rows) - 1
        else:
            free, row_id = room.pop(k)
            rows[row_id].append(i)
            free -= need
        if free > 0:
            bisect.insort(room, (free, row_id))
    return [tuple(r) for r in rows]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's order: a pure function of (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 63), epoch]))


class BatchPlan:
    """Micro-batches of a :class:`TokenizedDataset`, epoch by epoch (see module doc)."""

    def __init__(self, dataset: Any, batch_size: int, max_length: int, packing: bool = False,
                 seed: int = 0, shuffle: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_length = max_length
        self.packing = packing
        self.seed = seed
        self.shuffle = shuffle
        lengths = [len(e) for e in dataset.examples]
        too_long = [i for i, n in enumerate(lengths) if n > max_length]
        if too_long:
            i = too_long[0]
            raise ValueError(f"{dataset.examples[i].source}: {lengths[i]} tokens > max_length "
                             f"{max_length}; prepare the dataset with the same max_length")
        if packing:
            self.rows = pack_best_fit_decreasing(lengths, max_length)
        else:
            self.rows = [(i,) for i in range(len(lengths))]

    @property
    def num_batches(self) -> int:
        """Micro-batches per epoch."""
        return -(-len(self.rows) // self.batch_size)

    def batches(self, epoch: int) -> list[Batch]:
        """The micro-batches of ``epoch``, in order; the same (seed, epoch) gives the same list."""
        n = len(self.rows)
        order = epoch_rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        return [Batch(tuple(self.rows[j] for j in order[k:k + self.batch_size]))
                for k in range(0, n, self.batch_size)]

    def collate(self, batch: Batch) -> dict[str, np.ndarray]:
        return collate(self.dataset, batch)


def collate(dataset: Any, batch: Batch, pad_id: int | None = None) -> dict[str, np.ndarray]:
    """The batch layout of :mod:`algorithms.backend` (int32 ids, targets, segments; f32 mask)."""
    pad = dataset.pad_id if pad_id is None else pad_id
    examples = dataset.examples
    width = max(sum(len(examples[i]) for i in row) for row in batch.rows)
    shape = (len(batch.rows), width)
    input_ids = np.full(shape, pad, dtype=np.int32)
    targets = np.full(shape, pad, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.float32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    for r, row in enumerate(batch.rows):
        offset = 0
        for segment, i in enumerate(row, start=1):
            ids, mask = examples[i].input_ids, examples[i].loss_mask
            end = offset + len(ids)
            input_ids[r, offset:end] = ids
            targets[r, offset:end - 1] = ids[1:]
            loss_mask[r, offset:end - 1] = mask[1:]
            segment_ids[r, offset:end] = segment
            offset = end
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids}


def position_ids(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 in every segment (padding too; unused there), int32 ``[B, T]``.

    A packed document must see the same rotary positions as it would alone in a row.
    """
    seg = np.asarray(segment_ids)
    t = np.broadcast_to(np.arange(seg.shape[1], dtype=np.int32), seg.shape)
    starts = np.concatenate([np.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], 1)
    first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return (t - first).astype(np.int32)


def document_spans(segment_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every document in a batch, row by row, in position order.

    What the padding-free paths of both backends run: only these tokens, attention inside each
    span, rotary positions ``start .. start + length - 1`` (the positions the padded path uses).
    """
    seg = np.asarray(segment_ids)
    spans = []
    for r in range(seg.shape[0]):
        row = seg[r]
        edges = np.flatnonzero(np.diff(row, prepend=0, append=0))
        for a, b in itertools.pairwise(edges):
            if row[a] > 0:
                spans.append((r, int(a), int(b - a)))
    return spans
