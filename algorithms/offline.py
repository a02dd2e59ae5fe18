"""Offline preference algorithms (DPO family, CPO / SimPO, ORPO, KTO): data and per-batch inputs.

The losses live in :mod:`algorithms.preference`; this module gives the shared loop what they need
beyond the policy's log-probs, through its ``prepare`` hook:

- ``ref_per_token_logps`` when the loss uses a reference: from the ``--precompute-ref`` cache
  (:mod:`algorithms.ref_cache`) or computed on the fly by the backend (adapters disabled for
  LoRA/DoRA, a frozen copy for full fine-tuning, ``--ref-model``);
- for KTO's batch KL estimate, the policy's (detached) and the reference's log-probs of the
  mismatched ``kl_*`` rows: ``kl_per_token_logps`` and ``ref_kl_per_token_logps``. The KL rows
  pair each prompt with another example's completion, which changes with the batch, so they are
  never cached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .registry import PreparedData

KL_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids")


def data_preparer(kind: str, kl: Callable[[Any], bool] = lambda cfg: False) -> Callable:
    """``prepare_data`` for paired (DPO, CPO, ORPO...) or unpaired (KTO) preference data."""

    def prepare_data(cfg: Any, tokenizer: Any) -> PreparedData:
        from .data.pipeline import prepare_splits
        from .data.preference import FAMILIES
        from .data.preference_batching import PreferenceBatchPlan

        sets = prepare_splits(cfg, tokenizer, FAMILIES[kind])
        plans = {split: PreferenceBatchPlan(ds, cfg.batch_size, cfg.max_length, seed=cfg.seed,
                                            packing=cfg.packing, kl=kl(cfg))
                 for split, ds in sets.items() if ds is not None and len(ds.examples)}
        return PreparedData(plans["train"], plans.get("valid"),
                            {s: ds.split_report for s, ds in sets.items() if ds is not None})

    return prepare_data


def prepare_factory(uses_reference: Callable[[Any], bool]) -> Callable:
    """``make_prepare`` for the registry: adds reference log-probs when ``uses_reference(cfg)``
    (and ORPO's prompt-included NLL mask, WPO's per-token normaliser, when asked); None when a loss needs nothing more."""

    def make_prepare(cfg: Any, backend: Any, data: PreparedData, model_path: Path):
        with_reference = uses_reference(cfg)
        caches = (_precompute(cfg, backend, data, model_path)
                  if with_reference and cfg.precompute_ref else {})
        nll_with_prompt = getattr(cfg, "nll_include_prompt", False)
        wpo = getattr(cfg, "use_weighting", False)
        if not (with_reference or nll_with_prompt or wpo):
            return None

        def prepare(backend: Any, arrays: dict, batch: Any, plan: Any) -> None:
            if wpo:  # WPO's per-token normaliser, from the current policy (detached)
                arrays["wpo_log_norm"] = backend.per_token_log_sum_sq(arrays)
            if nll_with_prompt:  # ORPO's prompt-included NLL variant
                arrays["nll_loss_mask"] = arrays["loss_mask"] + arrays["prompt_mask"]
            if not with_reference:
                return
            cache = caches.get(id(plan))
            if cache is not None:
                keys = cache.row_keys(list(batch.indices), plan.dataset.kind == "paired")
                arrays["ref_per_token_logps"] = cache.rows(keys, arrays["input_ids"].shape[1])
            else:
                arrays["ref_per_token_logps"] = backend.reference_per_token_logps(arrays)
            if "kl_input_ids" in arrays:
                kl = {k: arrays[f"kl_{k}"] for k in KL_KEYS}
                arrays["kl_per_token_logps"] = backend.per_token_logps(kl)
                arrays["ref_kl_per_token_logps"] = backend.reference_per_token_logps(kl)

        return prepare

    return make_prepare


def _precompute(cfg: Any, backend: Any, data: PreparedData, model_path: Path) -> dict:
    from converters.models import resolve_model

    from . import ref_cache
    from .data.preference import dataset_fingerprint

    reference = resolve_model(cfg.ref_model) if cfg.ref_model else model_path
    model_fp = ref_cache.model_fingerprint(reference)
    root = ref_cache.cache_root(cfg.data)
    caches = {}
    for split, plan in (("train", data.train), ("valid", data.valid)):
        if plan is None:
            continue
        path = ref_cache.cache_file(root, split, model_fp, dataset_fingerprint(plan.dataset))
        caches[id(plan)] = ref_cache.load_or_precompute(backend, plan,
                                                        plan.dataset.kind == "paired", path)
    return caches
