"""The algorithms each backend's CLI offers: name -> (config class, loss factory, one-line help).

A new algorithm is one module in ``algorithms/`` plus one line here; the loop and both CLIs pick it
up without branching on its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """``prepare_data(cfg, tokenizer) -> PreparedData`` runs before any model loads;
    ``make_prepare(cfg, backend, data, model_path)`` returns the loop's per-batch hook (reference
    log-probs...) or is None; ``normaliser`` is what a micro-batch's share of a step counts
    ("tokens" for token-mean losses, "rows" for losses averaged over sequences or pairs)."""

    name: str
    config_cls: type
    make_loss: Callable
    summary: str
    prepare_data: Callable
    make_prepare: Callable | None = None
    normaliser: str = "tokens"


@dataclasses.dataclass
class PreparedData:
    """Batch plans for the splits, and the per-split reports printed before training."""

    train: Any
    valid: Any | None
    reports: dict[str, Any]


def scaled_by_micro_fraction(make_loss: Callable) -> Callable:
    """For losses that average over the sequences / pairs of their micro-batch: scale by the
    micro-batch's share of the step, so accumulated micro-batches sum to the step's mean."""

    def make(cfg: Any) -> Callable:
        loss_fn = make_loss(cfg)

        def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
            value, metrics = loss_fn(ops, per_token_logps, batch)
            return value * batch["micro_fraction"], metrics

        return loss

    return make


def algorithms() -> dict[str, Algorithm]:
    from . import sft
    from .offline import data_preparer, prepare_factory
    from .preference import cpo, dpo, kto, orpo

    paired = data_preparer("paired")
    reference = prepare_factory(lambda cfg: cfg.needs_reference)
    extras = prepare_factory(lambda cfg: False)

    def preference(name, cfg_cls, module, summary, prepare_data=paired, make_prepare=extras):
        return Algorithm(name, cfg_cls, scaled_by_micro_fraction(module.make_loss), summary,
                         prepare_data, make_prepare, "rows")

    return {
        "sft": Algorithm("sft", sft.SFTConfig, sft.make_loss,
                         "supervised fine-tuning (losses: nll, dft)", sft.prepare_data),
        "dpo": preference("dpo", dpo.DPOConfig, dpo, "direct preference optimisation and its "
                          "variants: IPO, hinge, robust, EXO, NCA, BCO, SPPO, AOT, APO, "
                          "DiscoPOP, RPO, MPO, LD-DPO, WPO", make_prepare=reference),
        "cpo": preference("cpo", cpo.CPOConfig, cpo,
                          "contrastive preference optimisation (reference-free; AlphaPO option)"),
        "simpo": preference("simpo", cpo.SimPOConfig, cpo,
                            "simple preference optimisation (length-normalised, margin gamma)"),
        "orpo": preference("orpo", orpo.ORPOConfig, orpo,
                           "odds-ratio preference optimisation (NLL + odds-ratio term)"),
        "kto": preference("kto", kto.KTOConfig, kto, "Kahneman-Tversky optimisation on "
                          "desirable / undesirable completions (paired data is unpaired)",
                          data_preparer("unpaired", kl=lambda cfg: cfg.needs_kl_batch),
                          prepare_factory(lambda cfg: True)),
    }
