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
    ("tokens" for token-mean losses, "rows" for losses averaged over sequences or pairs);
    ``train(cfg, backend, loss_fn, data, run_dir, prepare, normaliser)`` is the loop (the
    offline one of :mod:`algorithms.loop` unless the algorithm generates its own data)."""

    name: str
    config_cls: type
    make_loss: Callable
    summary: str
    prepare_data: Callable
    make_prepare: Callable | None = None
    normaliser: str = "tokens"
    train: Callable | None = None


@dataclasses.dataclass
class PreparedData:
    """Batch plans (or prompt sets) for the splits, the per-split reports printed before
    training, and whatever else the algorithm prepared before the model loads (``extras``)."""

    train: Any
    valid: Any | None
    reports: dict[str, Any]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    from .rl import config as rl_config
    from .rl import data as rl_data
    from .rl import policy_loss
    from .rl.trainer import train as rl_train

    paired = data_preparer("paired")
    reference = prepare_factory(lambda cfg: cfg.needs_reference)
    extras = prepare_factory(lambda cfg: False)

    def online(name, cfg_cls, summary):
        return Algorithm(name, cfg_cls, policy_loss.make_loss, summary, rl_data.prepare_data,
                         None, "rows", rl_train)

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
        "grpo": online("grpo", rl_config.GRPOConfig, "group relative policy optimisation "
                       "(online RL with verifiable rewards; --loss-type grpo|bnpo|dr_grpo|dapo)"),
        "dr_grpo": online("dr_grpo", rl_config.DrGRPOConfig,
                          "Dr. GRPO: GRPO without length and std normalisation"),
        "dapo": online("dapo", rl_config.DAPOConfig, "DAPO: clip-higher, token-level loss, "
                       "overlong shaping and filtering, dynamic sampling"),
        "gspo": online("gspo", rl_config.GSPOConfig,
                       "GSPO: sequence-level importance ratio and clipping"),
    }
