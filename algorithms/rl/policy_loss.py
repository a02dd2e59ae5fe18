"""The clipped policy loss of the GRPO family (ALGORITHMS.md 9.3, 9.4), written once over the
array-ops shim, so it runs unchanged on NumpyOps, MLXOps and TorchOps.

Batch keys (``[B, T]`` arrays are aligned with ``per_token_logps``):

- ``loss_mask`` [B, T]: 1 on the completion tokens that carry loss (truncated completions are
  already all 0 under ``mask_truncated_completions``), 0 on prompt and padding.
- ``advantages`` [B] (or [B, T]): ``A_i``, broadcast over the tokens of completion i.
- ``old_logps`` [B, T], optional: log-probs under the sampling policy. Absent (mu = 1):
  ``old = stop_gradient(logp)``, so the ratio is exactly 1 and its gradient is ``grad logp``.
- ``ref_logps`` [B, T]: reference log-probs; required when ``beta > 0``.
- ``num_items`` scalar: loss tokens in the whole generation batch (the optimiser step); used
  by ``dapo``. Absent: this micro-batch's loss tokens.
- ``micro_fraction`` scalar: this micro-batch's rows / the step's rows. Absent: 1.

Per token, with ``m`` the mask, ``lr = logp - old`` (0 off the mask), eps_lo = ``epsilon``,
eps_hi = ``effective_epsilon_high``::

    token level:     w_it = exp(lr_it)
    sequence (GSPO): w_i  = exp(sum_t m lr / sum_t m), one ratio per completion; the gradient
                     reaches every token through the mean
    l_t = -min(min(w, delta) A, clip(w, 1 - eps_lo, 1 + eps_hi) A)   (the cap only if delta > 0)
        + beta (exp(ref - logp) - (ref - logp) - 1)                   (k3 KL, if beta > 0)
          (times w with use_bias_correction_kl: DeepSeek-V3.2's unbiased KL gradient)

Aggregation of one micro-batch of B rows, written so that the micro-batches of a step SUM to the
step's loss (``f`` = ``micro_fraction``, ``L_max`` = ``max_completion_length``)::

    grpo     mean_i[ sum_t l m / max(sum_t m, 1) ] * f   (DeepSeekMath 1/|o_i|; empty rows add 0)
    bnpo     sum l m / max(sum m, 1) * f                 (token mean per micro-batch, as TRL)
    dr_grpo  sum l m / (B * L_max) * f                   (Dr. GRPO's constant normaliser)
    dapo     sum l m / num_items                          (token mean over the generation batch)

bnpo normalises by the micro-batch's own token count, so its step loss depends on how the step
is cut into micro-batches (exactly the step's token mean only when every micro-batch has the
same tokens per row); the other three do not depend on it.

Metrics (detached scalars; token means over the micro-batch's loss tokens):
``clip_ratio/low_mean`` (A < 0 and w < 1 - eps_lo: the gradient is clipped to 0),
``clip_ratio/high_mean`` (A > 0 and w > 1 + eps_hi), ``clip_ratio/region_mean`` (either),
``ratio/mean`` (w), and ``kl`` (k3) when beta > 0.
"""

from __future__ import annotations

from typing import Any

from .config import GRPOConfig


def _as_float(ops: Any, cond: Any) -> Any:
    return ops.where(cond, 1.0, 0.0)


def importance_weights(ops: Any, per_token_logps: Any, old_logps: Any, mask: Any,
                       level: str) -> Any:
    """``w = pi / pi_old`` per token [B, T] (token level) or per completion [B, 1] (sequence
    level: the geometric mean of the token ratios over the mask)."""
    log_ratio = ops.where(mask > 0, per_token_logps - old_logps, 0.0)
    if level == "token":
        return ops.exp(log_ratio)
    if level == "sequence":
        tokens = ops.maximum(ops.sum(mask, axis=1), 1.0)
        return ops.exp(ops.sum(log_ratio, axis=1) / tokens)[:, None]
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def k3_kl(ops: Any, per_token_logps: Any, ref_logps: Any, mask: Any) -> Any:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``exp(d) - d - 1``, d = ref - logp
    (0 off the mask). Non-negative, unbiased, gradient ``1 - exp(d)`` w.r.t. logp."""
    d = ops.where(mask > 0, ops.stop_gradient(ref_logps) - per_token_logps, 0.0)
    return ops.exp(d) - d - 1.0


def clipped_token_loss(ops: Any, w: Any, advantages: Any, eps_low: float, eps_high: float,
                       delta: float = 0.0) -> Any:
    """``-min(min(w, delta) A, clip(w, 1 - eps_low, 1 + eps_high) A)``; the ``delta`` cap
    (INTELLECT-2) applies only when delta > 0."""
    unclipped = ops.minimum(w, delta) if delta > 0 else w
    clipped = ops.clip(w, 1.0 - eps_low, 1.0 + eps_high)
    return -ops.minimum(unclipped * advantages, clipped * advantages)


def aggregate(ops: Any, per_token_loss: Any, mask: Any, batch: dict, loss_type: str,
              max_completion_length: int) -> Any:
    """This micro-batch's share of the step loss (see the module docstring's table)."""
    fraction = batch.get("micro_fraction", 1.0)
    masked = per_token_loss * mask
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
    raise ValueError(f"loss_type must be one of grpo, bnpo, dr_grpo, dapo, got {loss_type!r}")


def policy_loss(ops: Any, per_token_logps: Any, batch: dict,
                cfg: GRPOConfig) -> tuple[Any, dict[str, Any]]:
    """The GRPO-family loss of one micro-batch and its metrics; see the module docstring."""
    mask = batch["loss_mask"]
    advantages = batch["advantages"]
    if len(advantages.shape) == 1:
        advantages = advantages[:, None]
    old = batch.get("old_logps")
    old = ops.stop_gradient(per_token_logps if old is None else old)
    eps_low, eps_high = cfg.epsilon, cfg.effective_epsilon_high
    w = importance_weights(ops, per_token_logps, old, mask, cfg.importance_sampling_level)
    per_token_loss = clipped_token_loss(ops, w, advantages, eps_low, eps_high, cfg.delta)
    kl = None
    if cfg.beta > 0:
        if "ref_logps" not in batch:
            raise KeyError("beta > 0 needs batch['ref_logps'] (reference log-probs); "
                           "set --beta 0 to train without the KL term")
        kl = k3_kl(ops, per_token_logps, batch["ref_logps"], mask)
        if cfg.use_bias_correction_kl:
            kl = kl * w
        per_token_loss = per_token_loss + cfg.beta * kl
    loss = aggregate(ops, per_token_loss, mask, batch, cfg.loss_type, cfg.max_completion_length)

    tokens = ops.maximum(ops.sum(mask), 1.0)

    def token_mean(x: Any) -> Any:
        return ops.stop_gradient(ops.sum(x * mask) / tokens)

    low = _as_float(ops, w < 1.0 - eps_low) * _as_float(ops, advantages < 0)
    high = _as_float(ops, w > 1.0 + eps_high) * _as_float(ops, advantages > 0)
    metrics = {
        "clip_ratio/low_mean": token_mean(low),
        "clip_ratio/high_mean": token_mean(high),
        "clip_ratio/region_mean": token_mean(low + high),
        "ratio/mean": token_mean(w),
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    return loss, metrics


def make_loss(cfg: GRPOConfig):
    """``loss(ops, per_token_logps, batch) -> (scalar, metrics)`` for the training loop."""

    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return policy_loss(ops, per_token_logps, batch, cfg)

    return loss
