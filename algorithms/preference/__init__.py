"""Offline preference optimisation losses (docs/ALGORITHMS.md sections 3-6) and their configs.

Each module holds pure loss functions over per-token log-probs and one config dataclass;
``make_loss(cfg)`` returns ``(ops, per_token_logps, batch) -> (loss, metrics)`` as in
:mod:`algorithms.sft`. Paired batches put the chosen rows first, the rejected rows after.
"""

from .cpo import CPOConfig, SimPOConfig, cpo_loss
from .dpo import DPOConfig, dpo_loss
from .kto import KTOConfig, kto_loss
from .orpo import ORPOConfig, orpo_loss

__all__ = ["CPOConfig", "DPOConfig", "KTOConfig", "ORPOConfig", "SimPOConfig", "cpo_loss",
           "dpo_loss", "kto_loss", "orpo_loss"]
