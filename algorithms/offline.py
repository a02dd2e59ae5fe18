"""Offline preference algorithms (DPO family, CPO / SimPO, ORPO, KTO): data and per-batch inputs.

The losses live in :mod:`algorithms.preference`; this module gives the shared loop what they need
beyond the policy's own outputs, through its ``prepare`` hook:

- ``ref_per_token_logps`` when the loss uses a reference: from the ``--precompute-ref`` cache
  (:mod:`algorithms.ref_cache`) or computed on the fly by the backend (adapters disabled for
  LoRA/DoRA, a frozen copy for full fine-tuning, ``--ref-model``);
- for KTO, the KL anchor of the whole optimiser step, ``kl_estimate`` =
  ``max(0, mean_i log pi(y'_i|x_i) - log ref(y'_i|x_i))`` over mismatched pairs built across
  every example of the step (:meth:`PreferenceBatchPlan.kl_rows`), so 1 micro-batch of 4 and 2
  of 2 see the same estimate. The KL rows change with the batch, so they are never cached;
- ORPO with ``--nll-include-prompt``: ``nll_loss_mask`` = prompt + chosen tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from .backend import with_head_mask
from .data import PreparedData

KL_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids")  # of the mismatched rows

# prepare(backend, arrays, batches, plan): adds keys to the micro-batches of one step in place.
Prepare = Callable[[Any, list, list, Any], None]


def data_preparer(kind: str, kl: Callable[[Any], bool] = lambda cfg: False,
                  kl_pairing: Callable[[Any], str] = lambda cfg: "shuffled") -> Callable:
    """``prepare_data`` for paired (DPO, CPO, ORPO...) or unpaired (KTO) preference data;
    ``kl(cfg)`` and ``kl_pairing(cfg)`` say whether and how KTO's mismatched pairs are built."""

    def prepare_data(cfg: Any, tokenizer: Any) -> PreparedData:
        from .data.pipeline import prepare_splits
        from .data.preference import FAMILIES, check_both_labels
        from .data.preference_batching import PreferenceBatchPlan

        sets = prepare_splits(cfg, tokenizer, FAMILIES[kind])
        if kind == "unpaired":
            check_both_labels(sets["train"])
        plans = {split: PreferenceBatchPlan(ds, cfg.batch_size, cfg.max_length, seed=cfg.seed,
                                            packing=cfg.packing, kl=kl(cfg),
                                            kl_pairing=kl_pairing(cfg))
                 for split, ds in sets.items() if ds is not None and len(ds.examples)}
        return PreparedData(plans["train"], plans.get("valid"),
                            {s: ds.split_report for s, ds in sets.items() if ds is not None},
                            test=plans.get("test"))

    return prepare_data


def reference_prepare(cfg: Any, backend: Any, data: PreparedData,
                      model_path: Path) -> Prepare | None:
    """``make_prepare`` of DPO / KTO: reference log-probs (cached with ``--precompute-ref``) and
    KTO's KL rows; None when the loss needs no reference (``cfg.needs_reference``)."""
    if not cfg.needs_reference:
        return None
    caches = _precompute(cfg, backend, data, model_path) if cfg.precompute_ref else {}

    def prepare(backend: Any, arrays: list[dict], batches: list, plan: Any) -> None:
        for a, batch in zip(arrays, batches):
            cache = caches.get(id(plan))
            if cache is not None:  # this rank's rows of the batch (all of them in one process)
                share = distributed.shard_batch(batch)
                keys = cache.row_keys(list(share.indices), plan.dataset.kind == "paired")
                a["ref_per_token_logps"] = cache.rows(keys, a["input_ids"].shape[1])
            else:
                a["ref_per_token_logps"] = backend.reference_per_token_logps(
                    with_head_mask(a, "loss_mask"))  # what the losses read (test_head_rows)
        if plan.kl:
            z = step_kl_estimate(backend, plan, batches)
            for a in arrays:
                a["kl_estimate"] = z
                for key in [k for k in a if k.startswith("kl_") and k != "kl_estimate"]:
                    del a[key]

    return prepare


def step_kl_estimate(backend: Any, plan: Any, batches: list) -> np.float32:
    """KTO's ``z = max(0, mean_i [log pi(y'_i|x_i) - log ref(y'_i|x_i)])`` over the mismatched
    rows of the whole step (policy detached), computed a micro-batch of rows at a time.

    Distributed, ``batches`` are the step's global micro-batches: every rank builds the same
    mismatched rows, scores its share, and the sum and count are added over ranks."""
    world = distributed.current()
    rows = plan.kl_rows(batches)
    size = max(1, plan.batch_size // world.size)  # the plan's micro-batch is the global one
    mine = distributed.shard(len(rows["input_ids"]), world)
    total, count = 0.0, 0
    for start in distributed.lockstep(list(range(mine.start, mine.stop, size)), world):
        span = slice(0, 0) if start is None else slice(start, min(start + size, mine.stop))
        chunk = _trim({k: rows[k][span] for k in KL_KEYS})
        mask = chunk["loss_mask"]
        read = with_head_mask(chunk, "loss_mask")
        policy = backend.per_token_logps(read)
        reference = backend.reference_per_token_logps(read)
        total += float(((policy - reference) * mask).sum(dtype=np.float64))
        count += len(mask)
    total, count = world.all_sum([total, count])
    return np.float32(max(total / max(count, 1), 0.0))


def _trim(chunk: dict) -> dict:
    """Drop the all-padding columns a chunk of a wider array carries."""
    width = int((chunk["segment_ids"] > 0).sum(axis=1).max(initial=1))  # 1 for 0 rows
    return {k: v[:, :width] for k, v in chunk.items()}


def with_chosen_items(make_prepare: Callable | None = None) -> Callable:
    """``make_prepare`` for paired data: the algorithm's own hook (if any), then the step's
    count of chosen-response NLL tokens, ``num_chosen_items``, which the NLL terms (DPO's
    ``sft``, CPO's, ORPO's) divide by so that micro-batches sum to the step's token mean."""

    def make(cfg: Any, backend: Any, data: PreparedData, model_path: Path) -> Prepare:
        inner = make_prepare(cfg, backend, data, model_path) if make_prepare else None

        def prepare(backend: Any, arrays: list[dict], batches: list, plan: Any) -> None:
            if inner is not None:
                inner(backend, arrays, batches, plan)
            chosen = sum(float(a.get("nll_loss_mask", a["loss_mask"])[:len(a["loss_mask"]) // 2]
                               .sum()) for a in arrays)
            chosen = float(distributed.current().all_sum([chosen])[0])  # over every rank
            for a in arrays:
                a["num_chosen_items"] = np.float32(max(chosen, 1.0))

        if getattr(inner, "state", None) is not None:
            prepare.state = inner.state  # algorithm state the checkpoints must hold
        return prepare

    return make


def orpo_prepare(cfg: Any, backend: Any, data: PreparedData, model_path: Path) -> Prepare | None:
    """``make_prepare`` of ORPO: with ``--nll-include-prompt`` the NLL term covers prompt +
    chosen tokens (``nll_loss_mask``); None otherwise."""
    if not cfg.nll_include_prompt:
        return None

    def prepare(backend: Any, arrays: list[dict], batches: list, plan: Any) -> None:
        for a in arrays:
            a["nll_loss_mask"] = a["loss_mask"] + a["prompt_mask"]

    return prepare


def _precompute(cfg: Any, backend: Any, data: PreparedData, model_path: Path) -> dict:
    from converters.models import resolve_model

    from . import ref_cache
    from .data.preference import dataset_fingerprint

    reference = resolve_model(cfg.ref_model) if cfg.ref_model else model_path
    model_fp = ref_cache.model_fingerprint(reference)
    root = ref_cache.cache_root(cfg.data)
    if getattr(cfg, "init_adapter", "") and not cfg.ref_model:  # the reference is base + it
        from converters.fingerprint import combined, model_fingerprint

        model_fp = combined({"model": model_fp,
                             "init_adapter": combined(model_fingerprint(cfg.init_adapter))})
    caches = {}
    for split, plan in (("train", data.train), ("valid", data.valid)):
        if plan is None:
            continue
        path = ref_cache.cache_file(root, split, model_fp, dataset_fingerprint(plan.dataset))
        caches[id(plan)] = ref_cache.load_or_precompute(backend, plan,
                                                        plan.dataset.kind == "paired", path)
    return caches
