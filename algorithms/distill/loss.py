"""GKD's loss over the ``teacher_divergence`` model output (docs/ALGORITHMS.md).

``L = sum_t m_t JSD_beta,t / num_items``: the token mean over the completion tokens of the
whole optimiser step (TRL's GKD divides by the step's token count too), so gradient
accumulation changes nothing. The backend computes ``JSD_beta,t`` (per token, gradient to the
student) from ``batch["jsd_beta"]`` and ``batch["temperature"]``. Metric: ``divergence``, the
micro-batch's token mean (the loop weights micro-batches by their tokens).
"""

from __future__ import annotations

from typing import Any

from ..backend import Loss


def gkd_loss(ops: Any, divergence: Any, batch: dict) -> tuple[Any, dict]:
    mask = batch["loss_mask"]
    total = ops.sum(divergence * mask)
    num_items = batch.get("num_items")
    if num_items is None:
        num_items = ops.maximum(ops.sum(mask), 1.0)
    mean = ops.stop_gradient(total / ops.maximum(ops.sum(mask), 1.0))
    return total / num_items, {"divergence": mean}


def make_loss(cfg: Any) -> Loss:
    def loss(ops: Any, outputs: dict, batch: dict) -> tuple[Any, dict]:
        return gkd_loss(ops, outputs["teacher_divergence"], batch)

    return Loss(loss, {"teacher_divergence": True})
