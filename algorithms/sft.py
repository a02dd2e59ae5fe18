"""Supervised fine-tuning losses (docs/ALGORITHMS.md section 2), written once over per-token log-probs.

With ``m_t`` the loss mask, ``log p_t`` the log-probability of target token ``t`` and ``N`` the
number of loss tokens in the whole gradient-accumulated batch (``batch["num_items"]``):

- ``nll``: ``L = sum_t m_t * (-log p_t) / N``. Dividing every micro-batch by the same ``N`` makes
  the summed gradients a token mean over the accumulated batch, so 4 micro-batches of 1 equal
  one batch of 4.
- ``dft`` (Dynamic Fine-Tuning, arXiv 2508.05629): ``L = sum_t m_t * (-sg(p_t) * log p_t) / N``
  with ``p_t = exp(log p_t)`` and ``sg`` the stop-gradient: each token's NLL is weighted by its
  own (constant) probability.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .backend import Loss, logps_loss
from .config import TrainConfig, field


def nll_loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
    """Token-mean negative log-likelihood over the accumulated batch."""
    mask = batch["loss_mask"]
    loss = ops.sum(-per_token_logps * mask) / batch["num_items"]
    return loss, {"ntokens": ops.sum(mask)}


def dft_loss(ops: Any, per_token_logps: Any, batch: dict) -> tuple[Any, dict]:
    """NLL weighted per token by the detached probability ``sg(exp(log p_t))``."""
    mask = batch["loss_mask"]
    weight = ops.stop_gradient(ops.exp(per_token_logps))
    loss = ops.sum(-weight * per_token_logps * mask) / batch["num_items"]
    return loss, {"ntokens": ops.sum(mask)}


LOSSES = {"nll": nll_loss, "dft": dft_loss}


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: maximise the likelihood of the completion / assistant tokens."""

    loss_type: str = field("nll", "nll = token-mean NLL; dft = probability-weighted NLL",
                           list(LOSSES))


def make_loss(cfg: SFTConfig) -> Loss:
    return logps_loss(LOSSES[cfg.loss_type], positions="loss_mask")


def prepare_data(cfg: TrainConfig, tokenizer: Any):
    """Tokenised train/valid/test splits (every example validated) and their batch plans."""
    from .data import BatchPlan, PreparedData
    from .data.dataset import SFT
    from .data.pipeline import prepare_splits

    sets = prepare_splits(cfg, tokenizer, SFT)
    plans = {split: BatchPlan(ds, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed)
             for split, ds in sets.items() if ds is not None and len(ds)}
    return PreparedData(plans["train"], plans.get("valid"),
                        {split: ds.split_report for split, ds in sets.items() if ds is not None},
                        test=plans.get("test"))
