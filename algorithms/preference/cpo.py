"""CPO, SimPO and AlphaPO (docs/ALGORITHMS.md section 6): reference-free preference losses.

The score ``pi`` of a response is the **sum** of its token log-probs for sigmoid and hinge, the
**mean** for ipo and simpo. AlphaPO (arXiv 2501.03884) with ``alpha != 0`` replaces it by
``(1 - p^-alpha) / alpha = (1 - exp(-alpha pi)) / alpha``. With ``x = pi_c - pi_r``,
``eps = label_smoothing``:

- sigmoid (CPO, Xu et al. 2024): ``-(1 - eps) log sigma(beta x) - eps log sigma(-beta x)``
- hinge: ``relu(1 - beta x)``;  ipo: ``(x - 1 / (2 beta))^2``
- simpo (Meng et al. 2024): ``x <- x - gamma / beta``, then the sigmoid form:
  ``-log sigma(beta (avg_c - avg_r) - gamma)``

``L = mean_pairs(l) + cpo_alpha * NLL(chosen)``, the NLL a token mean over the chosen responses.
``CPOConfig`` keeps TRL's defaults (beta 0.1, cpo_alpha 1.0: ``loss_type=simpo`` there is
"CPO-SimPO"); ``SimPOConfig`` is pure SimPO (no NLL) with the paper-scale beta 2.5, gamma 1.375.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..backend import Loss, logps_loss
from ..config import _bad, field
from .common import (
    check_beta,
    check_label_smoothing,
    masked_nll,
    pair_metrics,
    pair_share,
    sequence_logps,
    split_pairs,
    step_nll,
)
from .config import PreferenceConfig

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
SMOOTHED = {"sigmoid", "simpo"}


def cpo_loss(ops: Any, per_token_logps: Any, batch: dict, *, loss_type: str, beta: float,
             cpo_alpha: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0,
             alpha: float = 0.0) -> tuple[Any, dict]:
    """CPO / SimPO / AlphaPO loss of a paired batch; see the module docstring."""
    mask_c, mask_r = split_pairs(batch["loss_mask"])
    lp_c, lp_r = split_pairs(per_token_logps)
    average = loss_type in ("ipo", "simpo")
    logps_c = sequence_logps(ops, lp_c, mask_c, average)
    logps_r = sequence_logps(ops, lp_r, mask_r, average)
    pi_c, pi_r = logps_c, logps_r
    if alpha != 0.0:
        pi_c = (1.0 - ops.exp(-alpha * pi_c)) / alpha
        pi_r = (1.0 - ops.exp(-alpha * pi_r)) / alpha
    x = pi_c - pi_r
    if loss_type == "simpo":
        x = x - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        eps = label_smoothing
        terms = -(1.0 - eps) * ops.log_sigmoid(beta * x) - eps * ops.log_sigmoid(-beta * x)
    elif loss_type == "hinge":
        terms = ops.maximum(1.0 - beta * x, 0.0)
    elif loss_type == "ipo":
        terms = ops.square(x - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}")
    pref = ops.mean(terms)
    nll = masked_nll(ops, lp_c, mask_c)
    metrics = {f"loss/{loss_type}": ops.stop_gradient(pref), "loss/nll": ops.stop_gradient(nll)}
    metrics.update(pair_metrics(ops, beta * pi_c, beta * pi_r, logps_c, logps_r))
    loss = pref * pair_share(batch)
    if cpo_alpha:
        loss = loss + cpo_alpha * step_nll(ops, lp_c, mask_c, batch)
    return loss, metrics


@dataclasses.dataclass
class CPOConfig(PreferenceConfig):
    """Contrastive Preference Optimization: reference-free preference loss plus NLL on chosen."""

    loss_type: str = field("sigmoid", "sigmoid = CPO; hinge; ipo; simpo = CPO-SimPO",
                           CPO_LOSS_TYPES)
    beta: float = field(0.1, "inverse temperature beta")
    cpo_alpha: float = field(1.0, "weight of the NLL on the chosen responses")
    label_smoothing: float = field(0.0, "label noise eps in [0, 0.5); sigmoid and simpo only")
    simpo_gamma: float = field(0.5, "SimPO target margin gamma (loss_type simpo)")
    alpha: float = field(0.0, "AlphaPO reward shape alpha; 0 = log-prob rewards")

    def validate(self) -> None:
        super().validate()
        check_beta(self)
        check_label_smoothing(self, SMOOTHED, [self.loss_type])
        if self.cpo_alpha < 0:
            _bad("cpo_alpha", self.cpo_alpha, "must be >= 0")


@dataclasses.dataclass
class SimPOConfig(PreferenceConfig):
    """SimPO: length-normalised, reference-free preference loss with a target margin gamma."""

    beta: float = field(2.5, "reward scale beta (paper range 2-2.5)")
    simpo_gamma: float = field(1.375, "target reward margin gamma (gamma / beta = 0.55)")
    cpo_alpha: float = field(0.0, "weight of an NLL on the chosen responses; 0 = pure SimPO")
    label_smoothing: float = field(0.0, "label noise eps in [0, 0.5)")
    alpha: float = field(0.0, "AlphaPO reward shape alpha; 0 = SimPO")

    def validate(self) -> None:
        super().validate()
        check_beta(self)
        check_label_smoothing(self, SMOOTHED, ["simpo"])
        if self.cpo_alpha < 0:
            _bad("cpo_alpha", self.cpo_alpha, "must be >= 0")


def make_loss(cfg: CPOConfig | SimPOConfig) -> Loss:
    loss_type = "simpo" if isinstance(cfg, SimPOConfig) else cfg.loss_type

    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return cpo_loss(ops, per_token_logps, batch, loss_type=loss_type, beta=cfg.beta,
                        cpo_alpha=cfg.cpo_alpha, label_smoothing=cfg.label_smoothing,
                        simpo_gamma=cfg.simpo_gamma, alpha=cfg.alpha)

    return logps_loss(loss, positions="loss_mask")  # the responses only
