"""The algorithms each backend's CLI offers: name -> config, data, loss and training loop.

A new algorithm is one module in ``algorithms/`` plus one entry here; the loops and both CLIs
pick it up without branching on its name. Dependencies point one way: this module imports the
algorithms, no algorithm imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backend import Loss


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """``prepare_data(cfg, tokenizer) -> PreparedData`` runs before any model loads;
    ``make_loss(cfg) -> Loss``; ``loop`` trains it (:func:`offline_loop` or
    :func:`online_loop`). Offline algorithms also say what a micro-batch's share of a step counts
    (``normaliser``: "tokens" for token-mean losses, "rows" for losses averaged over sequences or
    pairs) and may add per-step inputs (``make_prepare(cfg, backend, data, model_path)`` returns
    the hook, or None)."""

    name: str
    config_cls: type
    summary: str
    prepare_data: Callable
    make_loss: Callable[[Any], Loss]
    loop: Callable
    normaliser: str = "tokens"
    make_prepare: Callable = lambda cfg, backend, data, model_path: None
    make_pipeline: Callable = lambda cfg: None  # online: what a generation batch is

    def train(self, cfg: Any, backend: Any, data: Any, run_dir: Path, model_path: Path):
        return self.loop(self, cfg, backend, data, run_dir, model_path)

    def total_steps(self, cfg: Any, data: Any) -> int:
        """Optimiser steps the run will reach (``--steps``, else from ``--epochs`` and the
        data), known before the model loads."""
        if self.loop is online_loop:
            from .rl.trainer import total_steps

            return total_steps(cfg, len(data.train))
        from .loop import total_steps

        return total_steps(cfg, data.train.num_batches)


def offline_loop(algo: Algorithm, cfg: Any, backend: Any, data: Any, run_dir: Path,
                 model_path: Path):
    """The offline loop of :mod:`algorithms.loop` over prepared batch plans."""
    from .loop import train

    prepare = algo.make_prepare(cfg, backend, data, model_path)
    # a hook may keep algorithm state across steps (BCO's delta): checkpoints hold it
    return train(cfg, backend, algo.make_loss(cfg), data.train, data.valid, run_dir,
                 prepare=prepare, normaliser=algo.normaliser, test_plan=data.test,
                 state=getattr(prepare, "state", None))


def online_loop(algo: Algorithm, cfg: Any, backend: Any, data: Any, run_dir: Path,
                model_path: Path):
    """The online loop of :mod:`algorithms.rl.trainer`: rollout -> score -> advantage
    estimator -> update (or the algorithm's own pipeline)."""
    from .rl.trainer import train

    return train(cfg, backend, algo.make_loss(cfg), data, run_dir,
                 pipeline=algo.make_pipeline(cfg))


def algorithms() -> dict[str, Algorithm]:
    from . import sft
    from .distill import data as distill_data
    from .distill import loss as distill_loss
    from .distill.config import GKDConfig
    from .distill.pipeline import DistillPipeline
    from .offline import data_preparer, orpo_prepare, reference_prepare, with_chosen_items
    from .online_preference import config as op_config
    from .online_preference import losses as op_losses
    from .online_preference.pipeline import PairPipeline
    from .preference import bco, cpo, dpo, kto, orpo
    from .rl import data as rl_data
    from .rl import policy_loss, presets

    paired = data_preparer("paired")

    def offline(name: str, config_cls: type, summary: str, make_loss: Callable,
                prepare_data: Callable, normaliser: str, make_prepare: Callable | None = None):
        hooks = {"make_prepare": make_prepare} if make_prepare else {}
        return Algorithm(name=name, config_cls=config_cls, summary=summary,
                         prepare_data=prepare_data, make_loss=make_loss, loop=offline_loop,
                         normaliser=normaliser, **hooks)

    def preference(name: str, config_cls: type, module: Any, summary: str,
                   prepare_data: Callable = paired, make_prepare: Callable | None = None):
        if prepare_data is paired:  # NLL terms divide by the step's chosen tokens
            make_prepare = with_chosen_items(make_prepare)
        return offline(name, config_cls, summary, module.make_loss, prepare_data, "rows",
                       make_prepare)

    def online(name: str, config_cls: type, summary: str, make_loss: Callable | None = None,
               make_pipeline: Callable | None = None):
        hooks = {"make_pipeline": make_pipeline} if make_pipeline else {}
        return Algorithm(name=name, config_cls=config_cls, summary=summary,
                         prepare_data=rl_data.prepare_data,
                         make_loss=make_loss or policy_loss.make_loss, loop=online_loop,
                         normaliser="rows", **hooks)

    pairs, policy_rows = (lambda cfg: PairPipeline("pairs")), (lambda cfg: PairPipeline("policy"))

    entries = [
        offline("sft", sft.SFTConfig, "supervised fine-tuning (losses: nll, dft)", sft.make_loss,
                sft.prepare_data, "tokens"),
        preference("dpo", dpo.DPOConfig, dpo, "direct preference optimisation and its "
                   "variants: IPO, hinge, robust, EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP, RPO, "
                   "MPO, LD-DPO, WPO", make_prepare=bco.dpo_prepare),
        preference("cpo", cpo.CPOConfig, cpo,
                   "contrastive preference optimisation (reference-free; AlphaPO option)"),
        preference("simpo", cpo.SimPOConfig, cpo,
                   "simple preference optimisation (length-normalised, margin gamma)"),
        preference("orpo", orpo.ORPOConfig, orpo,
                   "odds-ratio preference optimisation (NLL + odds-ratio term)",
                   make_prepare=orpo_prepare),
        preference("kto", kto.KTOConfig, kto, "Kahneman-Tversky optimisation on desirable / "
                   "undesirable completions (paired data is unpaired)",
                   data_preparer("unpaired", kl=lambda cfg: cfg.needs_kl_batch,
                                 kl_pairing=lambda cfg: cfg.kl_pairing),
                   reference_prepare),
        preference("bco", bco.BCOConfig, bco, "binary classifier optimisation on desirable / "
                   "undesirable completions, the running mean reward as threshold (paired data "
                   "is unpaired)", data_preparer("unpaired"), bco.bco_prepare),
        *(online(name, config_cls, summary) for name, config_cls, summary in presets.PRESETS),
        online("online_dpo", op_config.OnlineDPOConfig, "online DPO: two policy completions per "
               "prompt ranked by the rewards, DPO (sigmoid / IPO) against the reference",
               op_losses.make_pair_loss, pairs),
        online("xpo", op_config.XPOConfig, "XPO: online DPO against the reference's own "
               "completion, plus the exploration term alpha log pi(y_ref)",
               op_losses.make_pair_loss, pairs),
        online("nash_md", op_config.NashMDConfig, "Nash-MD: the policy's completion against "
               "one from the policy/reference mixture, REINFORCE on the preference "
               "probability with a KL term", op_losses.make_nash_md_loss, policy_rows),
        Algorithm(name="gkd", config_cls=GKDConfig, summary="generalised knowledge "
                  "distillation from a --teacher: the generalised JSD on student (lmbda), "
                  "teacher (seq_kd) or data completions", prepare_data=distill_data.prepare_data,
                  make_loss=distill_loss.make_loss, loop=online_loop,
                  make_pipeline=lambda cfg: DistillPipeline()),
    ]
    return {a.name: a for a in entries}
