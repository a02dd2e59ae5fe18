"""The policy (and value) loss of every online algorithm, written once over the array-ops shim,
so it runs unchanged on NumpyOps, MLXOps and TorchOps (docs/ALGORITHMS.md, online RL).

Batch keys (``[B, T]`` arrays are aligned with the log-probs):

- ``loss_mask`` [B, T]: 1 on the completion tokens that carry loss (truncated completions are
  already all 0 under ``mask_truncated_completions``), 0 on prompt and padding.
- ``advantages`` [B] (sequence level, broadcast over tokens) or [B, T] (token level).
- ``old_per_token_logps`` [B, T], optional: log-probs under the sampling policy. Absent
  (on-policy): ``old = stop_gradient(logp)``, so the ratio is exactly 1 and its gradient is
  ``grad logp``.
- ``ref_per_token_logps`` [B, T]: reference log-probs; required with a KL loss term.
- ``entropy_mask`` [B, T], optional: 1 on the tokens kept by ``top_entropy_quantile``.
- ``returns``, ``old_values`` [B, T]: value targets and rollout-time values (gae).
- ``num_items``: loss tokens of the optimiser step (``dapo``); ``micro_fraction``: this
  micro-batch's share of the step's rows (the other aggregations). Absent: this micro-batch.

Model outputs: ``logps`` (with gradient), ``entropy`` (a metric; with gradient when
``entropy_coef`` > 0), ``values`` (with gradient, gae).

Per token, with ``m`` the mask, ``lr = logp - old`` (0 off the mask), eps_lo = ``epsilon``,
eps_hi = ``effective_epsilon_high``::

    token:          w_it = exp(lr_it)
    sequence:       w_i  = exp(sum_t m lr / sum_t m)    (GSPO: the geometric mean)
    sequence_sum:   w_i  = exp(sum_t m lr)              (RLOO: the ratio of the completions'
                                                         probabilities; exponent capped at 20)
    l_t = -min(min(w, delta) A, clip(w, 1 - eps_lo, 1 + eps_hi) A)   (clipped; delta if > 0)
        = -min(w, delta) A                                           (--no-clip-policy-ratio)

The other loss types replace that clipped objective (``sg`` = stop-gradient):

    cispo (MiniMax-M1)  l_t = -sg(min(w, 1 + eps_hi)) A log p_t   (the IS weight is capped,
                                                                    every token keeps a gradient)
    sapo  (Qwen, SAPO)  l_t = -(4 / tau) sigmoid(tau (w - 1)) A,  tau = tau_pos if A > 0
                                                                        else tau_neg
    luspo               the clipped l_t above (aggregated differently, see below)
    vespo               l_t = -sg(phi) A log p_t,  phi = exp(lam + k log W - lam W),
                        log W = clip(sum_t m clip(lr_t, -20, 20), log 1e-8, 20) per completion,
                        (k, lam) = (k_pos, lam_pos) if A >= 0 else (k_neg, lam_neg)

each with gradient ``A grad log p`` at w = 1 (phi(1) = 1; the gate's slope is 1 at w = 1).
    l_t *= entropy_mask_t                                   (top_entropy_quantile < 1)
    l_t += beta kl_t(logp, ref)                             (KL in the loss: k1, k2 or k3;
                                                             times w with
                                                             use_bias_correction_kl)
    l_t -= entropy_coef H_t                                 (entropy bonus)

with ``d = logp - ref``: k1 ``d``, k2 ``d^2 / 2``, k3 ``exp(-d) + d - 1`` (its gradient
``1 - exp(-d)``). Aggregation of one micro-batch of B rows, written so that the micro-batches
of a step SUM to the step's loss (``f`` = ``micro_fraction``, ``L_max`` =
``max_completion_length``)::

    grpo, sapo     mean_i[ sum_t l m / max(sum_t m, 1) ] * f   (DeepSeekMath 1/|o_i|; empty
                                                                rows add 0)
    bnpo           sum l m / max(sum m, 1) * f                 (token mean per micro-batch)
    dr_grpo        sum l m / (B * L_max) * f                   (Dr. GRPO's constant normaliser)
    dapo, cispo,   sum l m / num_items                          (token mean over the step)
    vespo
    luspo          mean_i[ sum_t l m ] * f                      (GSPO times the length |o_i|)

With a value head (gae) the loss adds ``vf_coef`` times the clipped value loss, aggregated the
same way: ``v_t = 1/2 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``, ``c`` =
``cliprange_value``, ``R`` the returns.

bnpo normalises by the micro-batch's own token count, so its step loss depends on how the step
is cut into micro-batches; the other three do not.

Metrics (detached, token means over the micro-batch's loss tokens): ``clip_ratio/low_mean``
(A < 0 and w < 1 - eps_lo: clipped to no gradient), ``clip_ratio/high_mean`` (A > 0 and
w > 1 + eps_hi), ``clip_ratio/region_mean`` (either; cispo: w above its cap, whatever the
sign of A; none for the soft sapo and vespo, which log ``vespo/phi_mean``), ``ratio/mean`` (w),
``approx_kl``
(``(logp - old)^2 / 2``), ``entropy``, ``kl`` (with a KL loss term); with a value head
``loss/policy``, ``loss/value``, ``values/mean``, ``values/clip_ratio``.
"""

from __future__ import annotations

import math
from typing import Any

from ..backend import Loss
from .config import OnlineConfig

_MAX_SEQUENCE_LOG_RATIO = 20.0
_VESPO_MIN_LOG_W = math.log(1e-8)
# where each loss type's token losses are averaged (see the module docstring's table)
AGGREGATION = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo",
               "cispo": "dapo", "sapo": "grpo", "luspo": "luspo", "vespo": "dapo"}
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _as_float(ops: Any, cond: Any) -> Any:
    return ops.where(cond, 1.0, 0.0)


def importance_weights(ops: Any, per_token_logps: Any, old_logps: Any, mask: Any,
                       level: str) -> Any:
    """``w = pi / pi_old`` per token [B, T] (token level) or per completion [B, 1] (sequence:
    geometric mean of the token ratios; sequence_sum: their product)."""
    log_ratio = ops.where(mask > 0, per_token_logps - old_logps, 0.0)
    if level == "token":
        return ops.exp(log_ratio)
    if level == "sequence":
        tokens = ops.maximum(ops.sum(mask, axis=1), 1.0)
        return ops.exp(ops.sum(log_ratio, axis=1) / tokens)[:, None]
    if level == "sequence_sum":
        total = ops.clip(ops.sum(log_ratio, axis=1), -_MAX_SEQUENCE_LOG_RATIO,
                         _MAX_SEQUENCE_LOG_RATIO)
        return ops.exp(total)[:, None]
    raise ValueError(f"importance_sampling_level must be token, sequence or sequence_sum, "
                     f"got {level!r}")


def kl_term(ops: Any, per_token_logps: Any, ref_logps: Any, mask: Any, estimator: str) -> Any:
    """The per-token KL loss term (0 off the mask), ``d = logp - sg(ref)``: k1 ``d``, k2
    ``d^2 / 2``, k3 ``exp(-d) + d - 1`` (Schulman's estimator: non-negative, unbiased)."""
    d = ops.where(mask > 0, per_token_logps - ops.stop_gradient(ref_logps), 0.0)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * ops.square(d)
    if estimator == "k3":
        return ops.exp(-d) + d - 1.0
    raise ValueError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def k3_kl(ops: Any, per_token_logps: Any, ref_logps: Any, mask: Any) -> Any:
    """Schulman's k3 estimator of KL(pi || ref) per token (0 off the mask)."""
    return kl_term(ops, per_token_logps, ref_logps, mask, "k3")


def clipped_token_loss(ops: Any, w: Any, advantages: Any, eps_low: float, eps_high: float,
                       delta: float = 0.0, clip: bool = True) -> Any:
    """``-min(min(w, delta) A, clip(w, 1 - eps_low, 1 + eps_high) A)``; the ``delta`` cap
    (INTELLECT-2) applies only when delta > 0; without ``clip``, ``-min(w, delta) A``."""
    unclipped = ops.minimum(w, delta) if delta > 0 else w
    if not clip:
        return -unclipped * advantages
    clipped = ops.clip(w, 1.0 - eps_low, 1.0 + eps_high)
    return -ops.minimum(unclipped * advantages, clipped * advantages)


def vespo_weights(ops: Any, per_token_logps: Any, old_logps: Any, mask: Any, advantages: Any,
                  cfg: OnlineConfig) -> Any:
    """VESPO's detached ``phi(W) = exp(lam + k log W - lam W)`` per completion (``[B, 1]``, or
    ``[B, T]`` with token-level advantages), ``W`` the completion's probability ratio."""
    log_ratio = ops.clip(ops.where(mask > 0, per_token_logps - old_logps, 0.0), -20.0, 20.0)
    log_w = ops.clip(ops.sum(log_ratio, axis=1), _VESPO_MIN_LOG_W, _MAX_SEQUENCE_LOG_RATIO)
    log_w = log_w[:, None]
    positive = advantages >= 0
    k = ops.where(positive, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = ops.where(positive, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg)
    return ops.stop_gradient(ops.exp(lam + k * log_w - lam * ops.exp(log_w)))


def token_objective(ops: Any, w: Any, per_token_logps: Any, old_logps: Any, mask: Any,
                    advantages: Any, cfg: OnlineConfig) -> tuple[Any, dict[str, Any]]:
    """Per-token policy loss ``l_t`` of ``cfg.loss_type`` (module docstring) and its extra
    per-token metrics."""
    kind = cfg.loss_type
    eps_low, eps_high = cfg.epsilon, cfg.effective_epsilon_high
    if kind in CLIPPED:
        return clipped_token_loss(ops, w, advantages, eps_low, eps_high, cfg.delta,
                                  cfg.clip_policy_ratio), {}
    if kind == "cispo":
        cap = 1.0 + eps_high
        weight = ops.stop_gradient(ops.minimum(w, cap))
        return -weight * advantages * per_token_logps, {"capped": _as_float(ops, w > cap)}
    if kind == "sapo":
        tau = ops.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        return -(4.0 / tau) * ops.sigmoid(tau * (w - 1.0)) * advantages, {}
    if kind == "vespo":
        phi = vespo_weights(ops, per_token_logps, old_logps, mask, advantages, cfg)
        return -phi * advantages * per_token_logps, {"vespo/phi_mean": phi}
    raise ValueError(f"unknown loss_type {kind!r}")


def aggregate(ops: Any, per_token_loss: Any, mask: Any, batch: dict, loss_type: str,
              max_completion_length: int) -> Any:
    """This micro-batch's share of the step loss (see the module docstring's table)."""
    fraction = batch.get("micro_fraction", 1.0)
    masked = per_token_loss * mask
    loss_type = AGGREGATION.get(loss_type, loss_type)
    if loss_type == "luspo":
        return ops.mean(ops.sum(masked, axis=1)) * fraction
    if loss_type == "grpo":
        per_seq = ops.sum(masked, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return ops.mean(per_seq) * fraction
    if loss_type == "bnpo":
        return ops.sum(masked) / ops.maximum(ops.sum(mask), 1.0) * fraction
    if loss_type == "dr_grpo":
        return ops.sum(masked) / (mask.shape[0] * max_completion_length) * fraction
    if loss_type == "dapo":
        num_items = batch.get("num_items")
        if num_items is None:
            num_items = ops.maximum(ops.sum(mask), 1.0)
        return ops.sum(masked) / num_items
    raise ValueError(f"loss_type must be one of {', '.join(AGGREGATION)}, got {loss_type!r}")


def value_loss(ops: Any, values: Any, batch: dict, cliprange_value: float) -> tuple[Any, Any]:
    """Per-token clipped value loss ``1/2 max((V - R)^2, (clip(V, V_old +- c) - R)^2)`` and
    whether the clipped branch was the larger (a metric)."""
    returns, old = batch["returns"], batch["old_values"]
    clipped = ops.clip(values - old, -cliprange_value, cliprange_value) + old
    plain_sq, clipped_sq = ops.square(values - returns), ops.square(clipped - returns)
    return 0.5 * ops.maximum(plain_sq, clipped_sq), clipped_sq > plain_sq


def policy_loss(ops: Any, per_token_logps: Any, batch: dict, cfg: OnlineConfig,
                entropy: Any = None, values: Any = None) -> tuple[Any, dict[str, Any]]:
    """The online loss of one micro-batch and its metrics; see the module docstring."""
    mask = batch["loss_mask"]
    advantages = batch["advantages"]
    if len(advantages.shape) == 1:
        advantages = advantages[:, None]
    old = batch.get("old_per_token_logps")
    old = ops.stop_gradient(per_token_logps if old is None else old)
    eps_low, eps_high = cfg.epsilon, cfg.effective_epsilon_high
    w = importance_weights(ops, per_token_logps, old, mask, cfg.importance_sampling_level)
    per_token_loss, extra = token_objective(ops, w, per_token_logps, old, mask, advantages, cfg)
    if "entropy_mask" in batch:
        per_token_loss = per_token_loss * batch["entropy_mask"]
    kl = None
    if cfg.beta > 0 and cfg.kl_penalty == "loss":
        if "ref_per_token_logps" not in batch:
            raise KeyError("a KL loss term needs batch['ref_per_token_logps'] (reference "
                           "log-probs); set --beta 0 to train without it")
        kl = kl_term(ops, per_token_logps, batch["ref_per_token_logps"], mask, cfg.kl_estimator)
        if cfg.use_bias_correction_kl:  # DeepSeek-V3.2: the KL gradient unbiased off-policy
            kl = kl * w
        per_token_loss = per_token_loss + cfg.beta * kl
    if cfg.entropy_coef > 0:
        per_token_loss = per_token_loss - cfg.entropy_coef * entropy

    def agg(x: Any) -> Any:
        return aggregate(ops, x, mask, batch, cfg.loss_type, cfg.max_completion_length)

    loss = agg(per_token_loss)
    tokens = ops.maximum(ops.sum(mask), 1.0)

    def token_mean(x: Any) -> Any:
        return ops.stop_gradient(ops.sum(x * mask) / tokens)

    metrics = {"ratio/mean": token_mean(w),
               "approx_kl": token_mean(0.5 * ops.square(per_token_logps - old))}
    if cfg.loss_type in CLIPPED:
        low = _as_float(ops, w < 1.0 - eps_low) * _as_float(ops, advantages < 0)
        high = _as_float(ops, w > 1.0 + eps_high) * _as_float(ops, advantages > 0)
        if not cfg.clip_policy_ratio:
            low, high = 0.0 * low, 0.0 * high
        metrics.update({"clip_ratio/low_mean": token_mean(low),
                        "clip_ratio/high_mean": token_mean(high),
                        "clip_ratio/region_mean": token_mean(low + high)})
    elif "capped" in extra:
        capped = token_mean(extra.pop("capped"))
        metrics.update({"clip_ratio/low_mean": 0.0 * capped, "clip_ratio/high_mean": capped,
                        "clip_ratio/region_mean": capped})
    metrics.update({k: token_mean(v) for k, v in extra.items()})
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    if values is not None:
        v_loss, v_clipped = value_loss(ops, values, batch, cfg.cliprange_value)
        value_term = agg(v_loss)
        metrics.update({"loss/policy": ops.stop_gradient(loss),
                        "loss/value": ops.stop_gradient(value_term),
                        "values/mean": token_mean(values),
                        "values/clip_ratio": token_mean(_as_float(ops, v_clipped))})
        loss = loss + cfg.vf_coef * value_term
    return loss, metrics


def make_loss(cfg: OnlineConfig) -> Loss:
    """The online loss for the training loop: log-probs with gradient, the entropy (with
    gradient under an entropy bonus), and the values of the value head (gae)."""

    def loss(ops: Any, outputs: dict, batch: dict) -> tuple[Any, dict]:
        return policy_loss(ops, outputs["logps"], batch, cfg, outputs.get("entropy"),
                           outputs.get("values"))

    wanted = {"logps": True, "entropy": cfg.entropy_coef > 0}
    if cfg.uses_value_head:
        wanted["values"] = True
    return Loss(loss, wanted, positions="loss_mask")  # the completions: no prompt position
