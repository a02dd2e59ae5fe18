"""The losses of online DPO, XPO and Nash-MD over the array-ops shim (docs/ALGORITHMS.md).

Sequence log-probs are masked sums at temperature 1: ``log pi(y)``, ``log ref(y)``, log-ratio
``rho = log pi - log ref``. Pair batches (:class:`algorithms.online_preference.pairs.PairBatch`)
hold ``2B`` rows, chosen rows ``[0, B)`` and their rejected rows ``[B, 2B)``; batch keys
``pair_weight [B]`` (0 for a pair with an unscorable completion), ``from_second [2B]`` (1 on
the second completion of each pair: XPO's reference sample), ``micro_fraction``.

Online DPO, per pair, ``h = rho_c - rho_r``:

    sigmoid   -log sigma(beta h)
    ipo       (h - 1 / (2 beta))^2

XPO adds ``alpha log pi(y_ref)`` per pair (``y_ref`` the reference's completion, chosen or
not). ``L = mean_pairs(w l) * f`` with ``w`` the pair weight (the exploration term unweighted).

Nash-MD (policy rows only, ``preference`` ``P [B]`` = sigma(r(y) - r(y'))), per completion:

    l = beta KL - (P - 1/2) log pi(y)
    KL = sg(rho) log pi(y)                  (kl_level sequence: the paper's REINFORCE estimate)
       = sum_t sg(log p_t - log ref_t) log p_t   (kl_level token: TRL's)

``L = mean(l) * f``: the gradient is ``-(P - 1/2 - beta rho) grad log pi(y)`` (sequence).
Metrics (detached): ``rewards/chosen`` = ``beta rho_c`` and the other DPO metrics, ``kl`` (the
mean ``rho`` over the micro-batch's completions), each loss term.
"""

from __future__ import annotations

from typing import Any

from ..backend import Loss, logps_loss
from ..preference.common import pair_metrics, pair_share, sequence_logps, split_pairs


def _sequences(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, Any]:
    mask = batch["loss_mask"]
    if "ref_per_token_logps" not in batch:
        raise KeyError("online preference losses need batch['ref_per_token_logps'] (reference "
                       "log-probs of every completion)")
    ref = ops.stop_gradient(batch["ref_per_token_logps"])
    return sequence_logps(ops, per_token_logps, mask), sequence_logps(ops, ref, mask)


def pair_loss(ops: Any, per_token_logps: Any, batch: dict, cfg: Any) -> tuple[Any, dict]:
    """Online DPO (and XPO with ``cfg.alpha``) on one micro-batch of pairs."""
    logps, ref = _sequences(ops, per_token_logps, batch)
    logp_c, logp_r = split_pairs(logps)
    ref_c, ref_r = split_pairs(ref)
    h = (logp_c - ref_c) - (logp_r - ref_r)
    if cfg.loss_type == "sigmoid":
        per_pair = -ops.log_sigmoid(cfg.beta * h)
    elif cfg.loss_type == "ipo":
        per_pair = ops.square(h - 1.0 / (2.0 * cfg.beta))
    else:
        raise ValueError(f"loss_type must be sigmoid or ipo, got {cfg.loss_type!r}")
    weight = batch.get("pair_weight", 1.0)
    dpo = ops.mean(weight * per_pair)
    sg = ops.stop_gradient
    metrics = {"loss/dpo": sg(dpo),
               **pair_metrics(ops, cfg.beta * (logp_c - ref_c), cfg.beta * (logp_r - ref_r),
                              logp_c, logp_r),
               "kl": ops.mean(sg(logps - ref))}
    total = dpo
    alpha = getattr(cfg, "alpha", 0.0)
    if alpha:
        n_pairs = logp_c.shape[0]
        explore = alpha * ops.sum(batch["from_second"] * logps) / n_pairs
        metrics["loss/xpo"] = sg(explore)
        total = total + explore
    return total * pair_share(batch), metrics


def nash_md_loss(ops: Any, per_token_logps: Any, batch: dict, cfg: Any) -> tuple[Any, dict]:
    """Nash-MD on one micro-batch of the policy's completions (module docstring)."""
    mask = batch["loss_mask"]
    logps, ref = _sequences(ops, per_token_logps, batch)
    sg = ops.stop_gradient
    score = (batch["preference"] - 0.5) * logps
    if cfg.kl_level == "sequence":
        kl = sg(logps - ref) * logps
    elif cfg.kl_level == "token":
        ratio = sg(per_token_logps - batch["ref_per_token_logps"])
        kl = ops.sum(ratio * per_token_logps * mask, axis=-1)
    else:
        raise ValueError(f"kl_level must be sequence or token, got {cfg.kl_level!r}")
    per_row = cfg.beta * kl - score
    loss = ops.mean(per_row)
    metrics = {"loss/score": ops.mean(sg(score)), "loss/kl": ops.mean(sg(kl)),
               "kl": ops.mean(sg(logps - ref)), "logps/policy": ops.mean(sg(logps)),
               "preference/mean": ops.mean(batch["preference"])}
    return loss * pair_share(batch), metrics


def make_pair_loss(cfg: Any) -> Loss:
    """Online DPO / XPO: log-probs with gradient (temperature 1), read on the completions."""

    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return pair_loss(ops, per_token_logps, batch, cfg)

    return logps_loss(loss, positions="loss_mask")


def make_nash_md_loss(cfg: Any) -> Loss:
    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return nash_md_loss(ops, per_token_logps, batch, cfg)

    return logps_loss(loss, positions="loss_mask")
