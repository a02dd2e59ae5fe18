"""The algorithms each backend's CLI offers: name -> (config class, loss factory, one-line help).

A new algorithm is one module in ``algorithms/`` plus one line here; the loop and both CLIs pick it
up without branching on its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """``prepare_data(cfg, tokenizer) -> PreparedData`` runs before any model loads;
    ``make_prepare(cfg, backend, data, model_path)`` returns the loop's per-batch hook (reference
    log-probs...) or is None; ``normaliser`` is what a micro-batch's share of a step counts
    ("tokens" for token-mean losses, "rows" for losses averaged over sequences or pairs)."""

    name: str
    config_cls: type
    make_loss: Callable
    summary: str
    prepare_data: Callable
    make_prepare: Callable | None = None
    normaliser: str = "tokens"


@dataclasses.dataclass
class PreparedData:
    """Batch plans for the splits, and the per-split reports printed before training."""

    train: Any
    valid: Any | None
    reports: dict[str, Any]


def algorithms() -> dict[str, Algorithm]:
    from . import sft

    return {
        "sft": Algorithm("sft", sft.SFTConfig, sft.make_loss,
                         "supervised fine-tuning (losses: nll, dft)", sft.prepare_data),
    }
