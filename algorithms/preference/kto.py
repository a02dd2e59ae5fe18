"""KTO: Kahneman-Tversky optimisation on unpaired completions (docs/ALGORITHMS.md section 4).

Rows are single completions with ``batch["label"]`` 1 (desirable) or 0 (undesirable).
``r = logp(y|x) - ref_logp(y|x)`` (masked sums). The KL anchor is estimated on mismatched pairs
``(x_i, y')`` (``kl_per_token_logps``, ``ref_kl_per_token_logps``, ``kl_loss_mask``):

``z = max(0, mean_batch(logp(y'|x) - ref_logp(y'|x)))``, detached (Ethayarajh et al. 2024).

- kto: desirable ``desirable_weight * (1 - sigma(beta (r - z)))``, undesirable
  ``undesirable_weight * (1 - sigma(beta (z - r)))``
- apo_zero_unpaired: desirable ``1 - sigma(beta r)``, undesirable ``sigma(beta r)``; no KL.

``L = mean over all rows``. The training loop passes ``z`` for the whole optimiser step as
``batch["kl_estimate"]`` (mismatched pairs rotated over every example of the step, so gradient
accumulation changes nothing); without it the micro-batch's own ``kl_*`` rows give ``z``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..backend import Loss, logps_loss
from ..config import _bad, field
from ..data.preference_batching import KL_PAIRINGS
from .common import check_beta, pair_share, sequence_logps
from .config import ReferenceConfig

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(ops: Any, batch: dict) -> Any:
    """Detached ``max(0, mean(logp(y'|x) - ref_logp(y'|x)))`` over the mismatched pairs."""
    mask = batch["kl_loss_mask"]
    kl = (sequence_logps(ops, batch["kl_per_token_logps"], mask)
          - sequence_logps(ops, batch["ref_kl_per_token_logps"], mask))
    return ops.stop_gradient(ops.maximum(ops.mean(kl), 0.0))


def kto_loss(ops: Any, per_token_logps: Any, batch: dict, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> tuple[Any, dict]:
    """Mean over rows of the KTO (or apo_zero_unpaired) loss; see the module docstring."""
    mask = batch["loss_mask"]
    label = batch["label"]
    logps = sequence_logps(ops, per_token_logps, mask)
    ref = sequence_logps(ops, ops.stop_gradient(batch["ref_per_token_logps"]), mask)
    r = logps - ref
    metrics: dict[str, Any] = {}
    if loss_type == "kto":
        # the step-wide estimate the loop computed, else this micro-batch's own KL rows
        z = batch["kl_estimate"] if "kl_estimate" in batch else kl_estimate(ops, batch)
        desirable = desirable_weight * (1.0 - ops.sigmoid(beta * (r - z)))
        undesirable = undesirable_weight * (1.0 - ops.sigmoid(beta * (z - r)))
        metrics["kl"] = z
    elif loss_type == "apo_zero_unpaired":
        desirable = 1.0 - ops.sigmoid(beta * r)
        undesirable = ops.sigmoid(beta * r)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}")
    loss = ops.mean(label * desirable + (1.0 - label) * undesirable)

    sg = ops.stop_gradient
    n_good = ops.maximum(ops.sum(label), 1.0)
    n_bad = ops.maximum(ops.sum(1.0 - label), 1.0)
    chosen = ops.sum(sg(beta * r) * label) / n_good
    rejected = ops.sum(sg(beta * r) * (1.0 - label)) / n_bad
    metrics.update({
        f"loss/{loss_type}": sg(loss),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "logps/chosen": ops.sum(sg(logps) * label) / n_good,
        "logps/rejected": ops.sum(sg(logps) * (1.0 - label)) / n_bad,
    })
    return loss * pair_share(batch), metrics


@dataclasses.dataclass
class KTOConfig(ReferenceConfig):
    """Kahneman-Tversky Optimization on prompt / completion / label (desirable or not) data."""

    beta: float = field(0.1, "KL strength beta")
    desirable_weight: float = field(1.0, "lambda_D, weight of desirable completions' loss")
    undesirable_weight: float = field(1.0, "lambda_U, weight of undesirable completions' loss")
    loss_type: str = field("kto", "kto; apo_zero_unpaired (no KL estimate)", KTO_LOSS_TYPES)
    kl_pairing: str = field(
        "shuffled", "the mismatched pairs of the KL estimate: shuffled = data reshuffled every "
        "epoch, each prompt with the next example's completion; sequential = TRL: data in file "
        "order every epoch, each prompt with the previous example's completion", KL_PAIRINGS)

    def validate(self) -> None:
        super().validate()
        check_beta(self)
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")

    @property
    def needs_kl_batch(self) -> bool:
        """Whether the batch must carry the mismatched-pair KL log-probs."""
        return self.loss_type == "kto"


def make_loss(cfg: KTOConfig) -> Loss:
    def loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
        return kto_loss(ops, per_token_logps, batch, beta=cfg.beta,
                        desirable_weight=cfg.desirable_weight,
                        undesirable_weight=cfg.undesirable_weight, loss_type=cfg.loss_type)

    return logps_loss(loss, positions="loss_mask")  # the responses only
