"""Pieces shared by the preference losses: pair splitting, sequence log-probs, metrics.

Batch layout (paired algorithms): ``2B`` rows, rows ``[0, B)`` the chosen responses and rows
``[B, 2B)`` the rejected ones, pair ``i`` = rows ``(i, B + i)``. ``per_token_logps`` and
``batch["loss_mask"]`` (1 on response tokens) are ``[2B, T]``; ``batch["ref_per_token_logps"]``
is present when the algorithm uses a reference model.

Every division by a length uses ``max(length, 1)``, so an all-masked row gives a sequence
log-prob of 0 (and a finite loss and gradient) instead of NaN.

Losses aggregate over the optimiser step, not the micro-batch: a mean over pairs is scaled by
``micro_fraction`` (:func:`pair_share`), a token-mean NLL divides by the step's token count
(:func:`step_nll`), so gradient accumulation changes nothing. Batches without those keys (a
loss called on hand-made arrays) are one whole step.
"""

from __future__ import annotations

from typing import Any

# log1mexp switches formula at -ln 2 (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) below.
_LN2 = 0.6931471805599453


def split_pairs(x: Any) -> tuple[Any, Any]:
    """``(chosen, rejected)`` halves of a ``[2B, ...]`` array."""
    n = x.shape[0] // 2
    return x[:n], x[n:]


def lengths(ops: Any, mask: Any) -> Any:
    """Tokens per row, at least 1 (so a mean over an all-masked row is 0, not NaN)."""
    return ops.maximum(ops.sum(mask, axis=-1), 1.0)


def sequence_logps(ops: Any, per_token_logps: Any, mask: Any, average: bool = False) -> Any:
    """Masked sum of per-token log-probs per row, or the mean over the masked tokens."""
    total = ops.sum(per_token_logps * mask, axis=-1)
    return total / lengths(ops, mask) if average else total


def ld_token_weights(ops: Any, mask_c: Any, mask_r: Any, ld_alpha: float) -> tuple[Any, Any]:
    """LD-DPO token weights: 1 on the first ``min(|y_c|, |y_r|)`` response tokens, ``ld_alpha``
    on the longer response's tail, 0 off the mask."""
    shared = ops.minimum(ops.sum(mask_c, axis=-1), ops.sum(mask_r, axis=-1))[:, None]

    def weights(mask):
        position = ops.cumsum(mask, axis=-1)  # 1-based index among the response tokens
        return ops.where(position <= shared, 1.0, ld_alpha) * mask

    return weights(mask_c), weights(mask_r)


def masked_nll(ops: Any, per_token_logps: Any, mask: Any) -> Any:
    """Token-mean negative log-likelihood over the masked tokens of the given rows."""
    return -ops.sum(per_token_logps * mask) / ops.maximum(ops.sum(mask), 1.0)


def step_nll(ops: Any, per_token_logps: Any, mask: Any, batch: dict) -> Any:
    """This micro-batch's part of the token-mean NLL over the whole optimiser step: its masked
    NLL sum divided by ``batch["num_chosen_items"]`` (the step's chosen-response tokens, set by
    the loop), so the micro-batches of a step sum to the step's token mean; without that key,
    this micro-batch's own token mean."""
    if "num_chosen_items" in batch:
        return -ops.sum(per_token_logps * mask) / batch["num_chosen_items"]
    return masked_nll(ops, per_token_logps, mask)


def pair_share(batch: dict) -> Any:
    """The factor that turns a mean over this micro-batch's pairs (or rows) into its part of
    the step's mean: ``micro_fraction`` (1 when the batch is the whole step)."""
    return batch.get("micro_fraction", 1.0)


def log1mexp(ops: Any, x: Any) -> Any:
    """``log(1 - exp(x))`` for ``x < 0``, computed stably on both sides of ``-ln 2``."""
    return ops.where(x > -_LN2, ops.log(-ops.expm1(x)), ops.log1p(-ops.exp(x)))


def fraction(ops: Any, cond: Any) -> Any:
    """Fraction of true entries of a boolean array."""
    return ops.mean(ops.where(cond, 1.0, 0.0))


def pair_metrics(ops: Any, chosen_rewards: Any, rejected_rewards: Any,
                 logps_chosen: Any, logps_rejected: Any) -> dict[str, Any]:
    """The per-step preference metrics (detached): rewards, margin, accuracy, log-probs."""
    sg = ops.stop_gradient
    rc, rr = sg(chosen_rewards), sg(rejected_rewards)
    return {
        "rewards/chosen": ops.mean(rc),
        "rewards/rejected": ops.mean(rr),
        "rewards/margin": ops.mean(rc - rr),
        "rewards/accuracy": fraction(ops, rc > rr),
        "logps/chosen": ops.mean(sg(logps_chosen)),
        "logps/rejected": ops.mean(sg(logps_rejected)),
    }


def check_beta(cfg: Any) -> None:
    from ..config import _bad

    if not cfg.beta > 0:
        _bad("beta", cfg.beta, "must be > 0")


def check_label_smoothing(cfg: Any, supported: set[str], loss_types: list[str]) -> None:
    from ..config import _bad

    eps = cfg.label_smoothing
    if not 0.0 <= eps < 0.5:
        _bad("label_smoothing", eps, "must be in [0, 0.5)")
    if eps > 0 and not supported.intersection(loss_types):
        _bad("label_smoothing", eps,
             f"is used only by loss types {', '.join(sorted(supported))}; "
             f"--loss-type is {' '.join(loss_types)}")
