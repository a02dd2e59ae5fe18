"""ORPO: odds-ratio preference optimisation (docs/ALGORITHMS.md section 5; Hong et al. 2024).

``P_c``, ``P_r`` are the **mean** token log-probs of the chosen / rejected responses,
``odds(P) = e^P / (1 - e^P)`` and

``log_odds = (P_c - P_r) - (log(1 - e^P_c) - log(1 - e^P_r))``
``L = NLL_chosen - beta * mean_pairs(log sigma(log_odds))``   (beta is the paper's lambda)

``log(1 - e^P)`` is computed stably (``log1mexp``), with ``P`` capped at ``-1e-6`` so a row whose
tokens are all certain (or all masked) stays finite. No reference model.

``NLL_chosen`` is a token mean over the chosen rows of ``batch["nll_loss_mask"]`` when the batch
has it, else of ``loss_mask`` (the paper: the response only). ``ORPOConfig.nll_include_prompt``
asks the data layer to put prompt + chosen tokens in ``nll_loss_mask`` (TRL's and the original
code's behaviour); the odds ratio always uses ``loss_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..backend import Loss, logps_loss
from ..config import field
from .common import (
    check_beta,
    log1mexp,
    masked_nll,
    pair_metrics,
    pair_share,
    sequence_logps,
    split_pairs,
    step_nll,
)
from .config import PreferenceConfig

_MAX_MEAN_LOGP = -1e-6


def orpo_loss(ops: Any, per_token_logps: Any, batch: dict, beta: float) -> tuple[Any, dict]:
    """``NLL_chosen - beta * mean(log sigma(log_odds))``; see the module docstring."""
    mask_c, mask_r = split_pairs(batch["loss_mask"])
    lp_c, lp_r = split_pairs(per_token_logps)
    mean_c = sequence_logps(ops, lp_c, mask_c, average=True)
    mean_r = sequence_logps(ops, lp_r, mask_r, average=True)
    p_c = ops.minimum(mean_c, _MAX_MEAN_LOGP)
    p_r = ops.minimum(mean_r, _MAX_MEAN_LOGP)
    log_odds = (p_c - p_r) - (log1mexp(ops, p_c) - log1mexp(ops, p_r))
    ratio = ops.mean(ops.log_sigmoid(log_odds))
    nll_mask_c, _ = split_pairs(batch.get("nll_loss_mask", batch["loss_mask"]))
    nll = masked_nll(ops, lp_c, nll_mask_c)
    loss = step_nll(ops, lp_c, nll_mask_c, batch) - beta * ratio * pair_share(batch)
    sg = ops.stop_gradient
    metrics = {"loss/nll": sg(nll), "loss/or": sg(-ratio), "log_odds_ratio": sg(ratio),
               "log_odds_chosen": sg(ops.mean(log_odds))}
    metrics.update(pair_metrics(ops, beta * mean_c, beta * mean_r, mean_c, mean_r))
    return loss, metrics


@dataclasses.dataclass
class ORPOConfig(PreferenceConfig):
    """Odds Ratio Preference Optimization: NLL on chosen plus an odds-ratio term, no reference."""

    beta: float = field(0.1, "weight lambda of the odds-ratio term")
    nll_include_prompt: bool = field(
        False, "NLL over prompt + chosen tokens (TRL / original code) instead of the response "
        "only (paper); changes only the data layer's nll_loss_mask")

    def validate(self) -> None:
        super().validate()
        check_beta(self)


def make_loss(cfg: ORPOConfig) -> Loss:
    @logps_loss
    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        if cfg.nll_include_prompt and "nll_loss_mask" not in batch:
            raise KeyError("--nll-include-prompt needs batch['nll_loss_mask'] (prompt + chosen)")
        return orpo_loss(ops, per_token_logps, batch, cfg.beta)

    return loss
