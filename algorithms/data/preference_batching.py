"""Preference batches: which examples go together (seed, epoch) and their numpy arrays.

Rows are padded, never packed (a pair's two rows must line up). Each epoch the examples are
shuffled by ``(seed, epoch)`` (:func:`.batching.epoch_rng`) and cut into :class:`.batching.Batch`
of ``batch_size`` examples; the last may be smaller; nothing is dropped.

Paired layout (``collate_paired``), for a batch of B pairs, every array ``[2B, T]``: rows
``[0, B)`` hold prompt + chosen, rows ``[B, 2B)`` prompt + rejected, pair ``i`` = rows
``(i, B + i)``. ``input_ids``, ``targets``, ``loss_mask``, ``segment_ids`` follow
:mod:`.batching` (targets shifted inside the row, 1-based segment 1, padding 0) with
``loss_mask`` = 1 on targets that are response tokens, plus

    prompt_mask[r, t] = 1 iff targets[r, t] is a prompt token

(ORPO's prompt-included NLL uses ``loss_mask + prompt_mask``; the first token of a row is never a
target, so it is in neither).

Unpaired layout (``collate_unpaired``, KTO), for B examples: the four arrays and ``prompt_mask``
``[B, T]``, ``label`` float32 ``[B]`` (1 desirable, 0 undesirable) and, for the batch KL estimate
``z = mean_i log pi(y'_i|x_i) / ref(y'_i|x_i)``, mismatched pairs

    kl_input_ids / kl_targets / kl_loss_mask / kl_segment_ids / kl_prompt_mask  [B, T']
    row i = prompt_i + completion_{(i + offset) mod B}

``kl_pairing`` (KTO's ``--kl-pairing``) chooses the pairs:

- ``shuffled`` (default): the examples are reshuffled every epoch and each prompt takes the NEXT
  example's completion (offset +1), so the mismatched pairs change from epoch to epoch;
- ``sequential`` (TRL): the examples stay in data-set order every epoch (for data unpaired from
  pairs: every desirable example first, then every undesirable one) and each prompt takes the
  PREVIOUS example's completion (offset -1), the same pairs every epoch.

A KL row is ``prompt_i`` + the WHOLE completion of its partner, as tokenised before that
completion's own row was cut to ``max_length``, cut once to ``max_length`` (keep start), as TRL
cuts it. With B = 1 the only partner is the example's own completion, which turns z into the
matched reward; ``collate_unpaired`` refuses it, and :class:`PreferenceBatchPlan` never builds
such a batch: it requires ``batch_size >= 2`` and folds a trailing one-example batch into the
batch before it (that batch then has ``batch_size + 1`` rows; TRL would pair that example with
itself). ``kl=False`` (``apo_zero_unpaired``) drops the KL arrays and the restriction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .batching import Batch, epoch_rng
from .preference import PreferenceExample, PromptResponse, UnpairedExample

KL_PAIRINGS = ("shuffled", "sequential")


class PreferenceBatchPlan:
    """Micro-batches of a :class:`.preference.PreferenceDataset`, epoch by epoch."""

    def __init__(self, dataset: Any, batch_size: int, max_length: int, seed: int = 0,
                 shuffle: bool = True, packing: bool = False, kl: bool = True,
                 kl_pairing: str = "shuffled"):
        if packing:
            raise ValueError("--packing is not supported for preference data (chosen and "
                             "rejected rows are padded side by side); drop --packing")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        if kl_pairing not in KL_PAIRINGS:
            raise ValueError(f"kl_pairing must be one of {', '.join(KL_PAIRINGS)}, got {kl_pairing!r}")
        self.kl = kl and dataset.kind == "unpaired"
        self.kl_offset = -1 if self.kl and kl_pairing == "sequential" else 1
        self.shuffle = shuffle and not (self.kl and kl_pairing == "sequential")
        if self.kl and batch_size < 2:
            raise ValueError(f"--batch-size={batch_size}: KTO's KL estimate pairs each prompt "
                             "with another example's completion, so a micro-batch needs >= 2 "
                             "examples")
        if self.kl and len(dataset.examples) < 2:
            raise ValueError("KTO's KL estimate needs at least 2 examples; the dataset has 1")
        for example in dataset.examples:
            if len(example) > max_length:
                raise ValueError(f"{example.source}: {len(example)} tokens > max_length "
                                 f"{max_length}; prepare the dataset with the same max_length")

    @property
    def num_batches(self) -> int:
        """Micro-batches per epoch."""
        n = len(self.dataset.examples)
        count = -(-n // self.batch_size)
        return count - 1 if self.kl and n % self.batch_size == 1 else count

    def batches(self, epoch: int) -> list[Batch]:
        """The micro-batches of ``epoch``, in order; the same (seed, epoch) gives the same list."""
        n = len(self.dataset.examples)
        order = epoch_rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
        groups = [[int(i) for i in order[k:k + self.batch_size]]
                  for k in range(0, n, self.batch_size)]
        if self.kl and len(groups) > 1 and len(groups[-1]) == 1:
            groups[-2].extend(groups.pop())
        return [Batch(tuple((i,) for i in g)) for g in groups]

    def collate(self, batch: Batch, kl: bool | None = None) -> dict[str, np.ndarray]:
        """The batch's arrays; ``kl=False`` leaves out the micro-batch's own mismatched rows
        (the training loop uses the step-wide estimate of :meth:`kl_rows` instead)."""
        if self.dataset.kind == "paired":
            return collate_paired(self.dataset, batch)
        return collate_unpaired(self.dataset, batch, kl=self.kl if kl is None else kl and self.kl,
                                max_length=self.max_length, offset=self.kl_offset)

    def kl_rows(self, batches: list[Batch]) -> dict[str, np.ndarray]:
        """The mismatched rows of a whole optimiser step: every example of ``batches`` in
        order, each prompt with the completion ``kl_offset`` places on (rotating over the whole
        step, so gradient accumulation does not change the pairs), as the arrays of
        :func:`_rows`."""
        step = Batch(tuple(row for b in batches for row in b.rows))
        arrays = collate_unpaired(self.dataset, step, kl=True, max_length=self.max_length,
                                  offset=self.kl_offset)
        return {k[len("kl_"):]: v for k, v in arrays.items() if k.startswith("kl_")}


def collate_paired(dataset: Any, batch: Batch) -> dict[str, np.ndarray]:
    """``[2B, T]`` arrays: chosen rows first, then rejected rows in the same order."""
    pairs: list[PreferenceExample] = [dataset.examples[i] for i in batch.indices]
    return _rows([p.chosen for p in pairs] + [p.rejected for p in pairs], dataset.pad_id)


def collate_unpaired(dataset: Any, batch: Batch, kl: bool = True, max_length: int | None = None,
                     offset: int = 1) -> dict[str, np.ndarray]:
    """``[B, T]`` arrays, ``label`` ``[B]`` and (``kl``) the mismatched ``kl_*`` arrays, row i
    pairing prompt i with completion ``(i + offset) mod B``."""
    examples: list[UnpairedExample] = [dataset.examples[i] for i in batch.indices]
    seqs = [e.sequence for e in examples]
    arrays = _rows(seqs, dataset.pad_id)
    arrays["label"] = np.array([float(e.label) for e in examples], dtype=np.float32)
    if kl:
        if len(seqs) < 2:
            raise ValueError("KTO's KL estimate needs >= 2 examples per micro-batch (with one, "
                             "the mismatched completion would be its own); got 1")
        limit = max_length or dataset.max_length
        mismatched = [kl_sequence(seqs[i], seqs[(i + offset) % len(seqs)], limit)
                      for i in range(len(seqs))]
        arrays.update({f"kl_{k}": v for k, v in _rows(mismatched, dataset.pad_id).items()})
    return arrays


def kl_sequence(prompt_of: PromptResponse, completion_of: PromptResponse,
                max_length: int) -> PromptResponse:
    """``prompt_of``'s prompt tokens + ``completion_of``'s whole response (before its own row was
    cut), cut once to ``max_length`` (keep start)."""
    response_ids, response_mask = completion_of.whole_response()
    ids = (prompt_of.prompt_ids + response_ids)[:max_length]
    mask = ([0] * prompt_of.prompt_length + response_mask)[:max_length]
    if mask:
        mask[0] = 0
    return PromptResponse(ids, mask, min(prompt_of.prompt_length, max_length))


def _rows(seqs: list[PromptResponse], pad: int) -> dict[str, np.ndarray]:
    shape = (len(seqs), max(len(s) for s in seqs))
    input_ids = np.full(shape, pad, dtype=np.int32)
    targets = np.full(shape, pad, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.float32)
    prompt_mask = np.zeros(shape, dtype=np.float32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    for r, seq in enumerate(seqs):
        n = len(seq)
        input_ids[r, :n] = seq.input_ids
        targets[r, :n - 1] = seq.input_ids[1:]
        loss_mask[r, :n - 1] = seq.loss_mask[1:]
        prompt_mask[r, :max(seq.prompt_length - 1, 0)] = 1.0  # targets 1 .. prompt_length-1
        segment_ids[r, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "prompt_mask": prompt_mask}


__all__ = ["KL_PAIRINGS", "PreferenceBatchPlan", "collate_paired", "collate_unpaired", "kl_sequence"]
