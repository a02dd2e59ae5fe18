"""DPO and its variants (docs/ALGORITHMS.md section 3), written once over per-token log-probs.

Sequence log-probs are masked sums: ``logp_c``, ``logp_r`` (policy), ``ref_c``, ``ref_r``
(reference; 0 when ``reference_free``), log-ratios ``rho = logp - ref``. With ``ld_alpha < 1``
(LD-DPO, arXiv 2409.06411) the tokens past ``min(|y_c|, |y_r|)`` count ``ld_alpha`` times, for
policy and reference alike. The f-divergence score ``s(rho) = f'(exp(rho))``
(``f_divergence_type``, Wang et al. 2023) is ``rho`` (reverse_kl), ``1 - exp(-rho)``
(forward_kl), ``log 2 + log sigma(rho)`` (js_divergence) or ``(exp((a - 1) rho) - 1) / (a - 1)``
(alpha_divergence, exponent clamped at 80; ``a ~ 1`` gives ``rho``): each is 0 at the reference
(``rho = 0``). The shift cancels in ``s_c - s_r`` but not after ipo's or sigmoid_norm's division
by the lengths. The losses that use the raw log-ratio or score each side alone (nca_pair,
bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down) refuse an f-divergence other than
reverse_kl, as TRL does. ``Delta = s_c - s_r``, ``z = beta * Delta``, ``eps = label_smoothing``.
Per pair:

- sigmoid: ``-log sigma(z)``;  hinge (SLiC): ``relu(1 - z)``
- ipo: ``(s_c / |y_c| - s_r / |y_r| - 1 / (2 beta))^2`` (beta is IPO's tau)
- robust: ``[-(1 - eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)``
- exo_pair: ``sigma(z)(log sigma(z) - log(1 - eps)) + sigma(-z)(log sigma(-z) - log eps)``
- nca_pair: ``-log sigma(beta s_c) - 1/2 log sigma(-beta s_c) - 1/2 log sigma(-beta s_r)``
- bco_pair: ``-log sigma(beta s_c - d) - log sigma(-(beta s_r - d))`` with ``d = 0`` (TRL 1.x),
  or with ``--bco-running-delta`` BCO's running mean of every reward so far,
  ``batch["bco_reward_mean"]`` (kept by the loop, :func:`algorithms.preference.bco.running_delta`,
  from the metric ``bco/batch_reward_mean``, this batch's mean of ``beta s``)
- sppo_hard: ``(s_c - 1 / (2 beta))^2 + (s_r + 1 / (2 beta))^2``
- aot: ``d = sort(logp_c - logp_r) - sort(ref_c - ref_r)`` over the batch, then
  ``-(1 - eps) log sigma(beta d) - eps log sigma(-beta d)``; aot_unpaired: ``d = sort(rho_c) -
  sort(rho_r)``
- apo_zero: ``(1 - sigma(beta rho_c)) + sigma(beta rho_r)`` (raw rho);
  apo_down: ``sigma(beta rho_c) + (1 - sigma(z))``
- discopop: ``(1 - sigma(z / tau)) (-log sigma(z)) + sigma(z / tau) exp(-z)``
- sigmoid_norm: ``-log sigma(beta (s_c / |y_c| - s_r / |y_r|))`` (Tulu-3)
- sft: token-mean NLL of the chosen responses over the batch (with sigmoid: RPO)

``L = sum_k w_k * mean_pairs(l_k)`` (``loss_weights``, MPO), each pair mean scaled by the
micro-batch's share of the step and the ``sft`` term a token mean over the step's chosen tokens
(``common.pair_share``, ``common.step_nll``); under WPO the ``sft`` term is weighted by the
micro-batch's mean pair weight. With ``use_weighting`` (WPO,
arXiv 2406.11827) every ``l`` is multiplied by the detached ``w_c * w_r``,
``w = exp(mean_t[log p_t - log sum_v p_v^2])``; the backend computes ``log sum_v p_v^2`` per
token in the same pass as the log-probs (the ``log_sum_sq`` model output, [2B, T]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from ..backend import Loss
from ..config import _bad, field
from .common import (
    check_beta,
    check_label_smoothing,
    ld_token_weights,
    lengths,
    masked_nll,
    pair_metrics,
    pair_share,
    sequence_logps,
    split_pairs,
    step_nll,
)
from .config import ReferenceConfig

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
              "sigmoid_norm", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}
# the loss types built on the f-divergence score of the pair difference (TRL accepts an
# f-divergence other than reverse_kl with these only)
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                       "sft"}
NEEDS_REFERENCE = {"aot", "aot_unpaired", "apo_zero", "apo_down"}


class Pairs(NamedTuple):
    """Per-pair quantities every loss type draws from (each ``[B]`` unless noted)."""

    logp_c: Any
    logp_r: Any
    ref_c: Any
    ref_r: Any
    s_c: Any        # f-divergence scores of the log-ratios
    s_r: Any
    len_c: Any      # response lengths, at least 1
    len_r: Any
    nll: Any        # scalar: token-mean NLL of the chosen responses (this micro-batch)
    step_nll: Any   # scalar: this micro-batch's part of the step's chosen-token NLL mean


def f_score(ops: Any, rho: Any, kind: str, alpha: float) -> Any:
    """``f'(exp(rho))`` of the chosen f-divergence: 0 at ``rho = 0`` for every kind."""
    if kind == "forward_kl":
        return 1.0 - ops.exp(-rho)
    if kind == "js_divergence":
        return math.log(2.0) + ops.log_sigmoid(rho)
    if kind == "alpha_divergence" and abs(alpha - 1.0) > 1e-6:
        return (ops.exp(ops.clip((alpha - 1.0) * rho, None, 80.0)) - 1.0) / (alpha - 1.0)
    return rho


def _smoothed_sigmoid(ops, z, eps):
    return -(1.0 - eps) * ops.log_sigmoid(z) - eps * ops.log_sigmoid(-z)


def _loss_terms(ops: Any, kind: str, p: Pairs, cfg: DPOConfig, batch: dict) -> Any:
    """Per-pair loss ``l`` of one loss type (``[B]``; sft gives a scalar)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    z = beta * (p.s_c - p.s_r)
    if kind == "sigmoid":
        return -ops.log_sigmoid(z)
    if kind == "hinge":
        return ops.maximum(1.0 - z, 0.0)
    if kind == "ipo":
        return ops.square(p.s_c / p.len_c - p.s_r / p.len_r - 1.0 / (2.0 * beta))
    if kind == "robust":
        return (-(1.0 - eps) * ops.log_sigmoid(z) + eps * ops.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    if kind == "exo_pair":
        return (ops.sigmoid(z) * (ops.log_sigmoid(z) - math.log(1.0 - eps))
                + ops.sigmoid(-z) * (ops.log_sigmoid(-z) - math.log(eps)))
    if kind == "nca_pair":
        return (-ops.log_sigmoid(beta * p.s_c) - 0.5 * ops.log_sigmoid(-beta * p.s_c)
                - 0.5 * ops.log_sigmoid(-beta * p.s_r))
    if kind == "bco_pair":
        delta = batch.get("bco_reward_mean", 0.0)
        return -ops.log_sigmoid(beta * p.s_c - delta) - ops.log_sigmoid(-(beta * p.s_r - delta))
    if kind == "sppo_hard":
        return ops.square(p.s_c - 0.5 / beta) + ops.square(p.s_r + 0.5 / beta)
    if kind == "aot":
        d = ops.sort(p.logp_c - p.logp_r) - ops.sort(p.ref_c - p.ref_r)
        return _smoothed_sigmoid(ops, beta * d, eps)
    if kind == "aot_unpaired":
        d = ops.sort(p.logp_c - p.ref_c) - ops.sort(p.logp_r - p.ref_r)
        return _smoothed_sigmoid(ops, beta * d, eps)
    if kind == "apo_zero":
        return (1.0 - ops.sigmoid(beta * (p.logp_c - p.ref_c))) + ops.sigmoid(
            beta * (p.logp_r - p.ref_r))
    if kind == "apo_down":
        return ops.sigmoid(beta * (p.logp_c - p.ref_c)) + (1.0 - ops.sigmoid(z))
    if kind == "discopop":
        gate = ops.sigmoid(z / cfg.discopop_tau)
        return (1.0 - gate) * (-ops.log_sigmoid(z)) + gate * ops.exp(-z)
    if kind == "sigmoid_norm":
        return -ops.log_sigmoid(beta * (p.s_c / p.len_c - p.s_r / p.len_r))
    if kind == "sft":
        return p.nll
    raise ValueError(f"unknown DPO loss_type {kind!r}")


def _pairs(ops: Any, per_token_logps: Any, batch: dict, cfg: DPOConfig) -> Pairs:
    mask_c, mask_r = split_pairs(batch["loss_mask"])
    w_c, w_r = mask_c, mask_r
    if cfg.ld_alpha < 1.0:
        w_c, w_r = ld_token_weights(ops, mask_c, mask_r, cfg.ld_alpha)
    lp_c, lp_r = split_pairs(per_token_logps)
    logp_c, logp_r = sequence_logps(ops, lp_c, w_c), sequence_logps(ops, lp_r, w_r)
    if cfg.reference_free or "ref_per_token_logps" not in batch:
        if not cfg.reference_free and not set(cfg.loss_type) <= {"sft"}:
            raise KeyError("DPO needs batch['ref_per_token_logps'] unless --reference-free")
        ref_c = ref_r = 0.0 * logp_c
    else:
        ref_tok_c, ref_tok_r = split_pairs(ops.stop_gradient(batch["ref_per_token_logps"]))
        ref_c, ref_r = sequence_logps(ops, ref_tok_c, w_c), sequence_logps(ops, ref_tok_r, w_r)
    alpha = cfg.f_alpha_divergence_coef
    return Pairs(
        logp_c, logp_r, ref_c, ref_r,
        f_score(ops, logp_c - ref_c, cfg.f_divergence_type, alpha),
        f_score(ops, logp_r - ref_r, cfg.f_divergence_type, alpha),
        lengths(ops, mask_c), lengths(ops, mask_r),
        masked_nll(ops, lp_c, mask_c), step_nll(ops, lp_c, mask_c, batch),
    )


def wpo_weights(ops: Any, per_token_logps: Any, log_sum_sq: Any, mask: Any) -> Any:
    """Detached WPO pair weights ``w_c * w_r``, ``w = exp(mean_t[log p_t - log sum_v p_v^2])``."""
    if log_sum_sq is None:
        raise KeyError("--use-weighting needs the log_sum_sq model output (log sum_v p_v^2 per "
                       "token)")
    adjusted = sequence_logps(ops, per_token_logps - log_sum_sq, mask, average=True)
    a_c, a_r = split_pairs(ops.stop_gradient(adjusted))
    return ops.exp(a_c + a_r)


def dpo_loss(ops: Any, per_token_logps: Any, batch: dict, cfg: DPOConfig,
             log_sum_sq: Any = None) -> tuple[Any, dict]:
    """``sum_k w_k * mean_pairs(l_k)`` over ``cfg.loss_type``; see the module docstring.
    ``log_sum_sq`` (``log sum_v p_v^2`` per token) is read only by WPO (``use_weighting``)."""
    p = _pairs(ops, per_token_logps, batch, cfg)
    pair_weight = (wpo_weights(ops, per_token_logps, log_sum_sq, batch["loss_mask"])
                   if cfg.use_weighting else None)
    weights = cfg.weights()
    metrics: dict[str, Any] = {}
    total = 0.0
    for kind, w in zip(cfg.loss_type, weights):
        terms = _loss_terms(ops, kind, p, cfg, batch)
        if pair_weight is not None:
            terms = terms * pair_weight
        component = ops.mean(terms)
        metrics[f"loss/{kind}"] = ops.stop_gradient(component)
        if kind == "sft":  # a token mean over the step's chosen tokens
            share = p.step_nll if pair_weight is None else p.step_nll * ops.mean(pair_weight)
        else:
            share = component * pair_share(batch)
        total = total + w * share
    rho_c, rho_r = p.logp_c - p.ref_c, p.logp_r - p.ref_r
    metrics.update(pair_metrics(ops, cfg.beta * rho_c, cfg.beta * rho_r, p.logp_c, p.logp_r))
    if "bco_pair" in cfg.loss_type:
        both = ops.mean(cfg.beta * p.s_c) + ops.mean(cfg.beta * p.s_r)
        metrics["bco/batch_reward_mean"] = ops.stop_gradient(both / 2.0)
    if pair_weight is not None:
        metrics["wpo/weight"] = ops.mean(pair_weight)
    return total, metrics


@dataclasses.dataclass
class DPOConfig(ReferenceConfig):
    """Direct Preference Optimization and its variants on prompt / chosen / rejected pairs."""

    loss_type: list = field(  # noqa: RUF009 (field() returns a default_factory field)
        ["sigmoid"], f"one or several of: {', '.join(LOSS_TYPES)} (several: MPO; sigmoid sft: RPO)")
    loss_weights: list = field(  # noqa: RUF009
        [], "weight of each --loss-type in the total (MPO); empty = 1.0 each")
    beta: float = field(0.1, "KL strength beta (IPO's tau for ipo)")
    label_smoothing: float = field(
        0.0, "label noise eps in [0, 0.5); used by robust, exo_pair (needs > 0, paper 1e-3), aot")
    f_divergence_type: str = field("reverse_kl", "divergence scoring the log-ratios",
                                   F_DIVERGENCES)
    f_alpha_divergence_coef: float = field(0.5, "alpha of alpha_divergence")
    ld_alpha: float = field(
        1.0, "LD-DPO: weight of the tokens past the shorter response's length; 1 = plain DPO")
    use_weighting: bool = field(False, "WPO: weight each pair by its policy probability")
    reference_free: bool = field(False, "use reference log-probs of 0 (no reference model)")
    discopop_tau: float = field(0.05, "temperature tau of the discopop loss")
    bco_running_delta: bool = field(
        False, "bco_pair: subtract BCO's delta, the running mean of every reward so far (this "
        "step's included; kept across steps and in checkpoints), as the BCO paper and TRL "
        "before 0.29; off = delta 0, TRL 1.x's bco_pair")

    def weights(self) -> list[float]:
        return [float(w) for w in self.loss_weights] or [1.0] * len(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """Whether the batch must carry ``ref_per_token_logps``."""
        return not self.reference_free and not set(self.loss_type) <= {"sft"}

    def validate(self) -> None:
        super().validate()
        if not self.loss_type:
            _bad("loss_type", self.loss_type, "needs at least one loss type")
        for kind in self.loss_type:
            if kind not in LOSS_TYPES:
                _bad("loss_type", kind, f"must be one of {', '.join(LOSS_TYPES)}")
        if len(set(self.loss_type)) != len(self.loss_type):
            _bad("loss_type", " ".join(self.loss_type), "lists a loss type twice")
        try:
            self.weights()
        except ValueError:
            _bad("loss_weights", " ".join(map(str, self.loss_weights)), "must be numbers")
        if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
            _bad("loss_weights", " ".join(map(str, self.loss_weights)),
                 f"needs one weight per --loss-type ({len(self.loss_type)}), "
                 f"got {len(self.loss_weights)}")
        check_beta(self)
        check_label_smoothing(self, SMOOTHED, self.loss_type)
        if "exo_pair" in self.loss_type and self.label_smoothing <= 0:
            _bad("label_smoothing", self.label_smoothing, "must be > 0 for exo_pair (paper: 1e-3)")
        if not 0.0 <= self.ld_alpha <= 1.0:
            _bad("ld_alpha", self.ld_alpha, "must be in [0, 1]")
        if self.discopop_tau <= 0:
            _bad("discopop_tau", self.discopop_tau, "must be > 0")
        if self.f_alpha_divergence_coef <= 0:
            _bad("f_alpha_divergence_coef", self.f_alpha_divergence_coef, "must be > 0")
        raw = sorted(set(self.loss_type) - F_DIVERGENCE_LOSSES)
        if self.f_divergence_type != "reverse_kl" and raw:
            _bad("f_divergence_type", self.f_divergence_type,
                 f"works with loss types {', '.join(sorted(F_DIVERGENCE_LOSSES))}; "
                 f"{', '.join(raw)} use the log-ratios themselves (drop --f-divergence-type)")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            _bad("use_weighting", True, "is not supported with aot / aot_unpaired")
        if self.bco_running_delta and "bco_pair" not in self.loss_type:
            _bad("bco_running_delta", True, "is the delta of the bco_pair loss; add bco_pair to "
                 "--loss-type or drop the flag")
        anchored = NEEDS_REFERENCE.intersection(self.loss_type)
        if self.reference_free and anchored:
            _bad("reference_free", True,
                 f"{', '.join(sorted(anchored))} compares against the reference; drop "
                 "--reference-free or use another --loss-type (SimPO is the reference-free variant)")


def make_loss(cfg: DPOConfig) -> Loss:
    """The DPO loss; WPO also reads ``log sum_v p_v^2`` (no gradient) from the same pass."""

    def loss(ops: Any, outputs: dict, batch: dict) -> tuple[Any, dict]:
        return dpo_loss(ops, outputs["logps"], batch, cfg, outputs.get("log_sum_sq"))

    wanted = {"logps": True, **({"log_sum_sq": False} if cfg.use_weighting else {})}
    return Loss(loss, wanted, positions="loss_mask")  # the responses: no prompt position
