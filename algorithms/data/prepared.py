"""What an algorithm prepares before any model loads: batch plans or prompt sets per split."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PreparedData:
    """Batch plans (or prompt sets) for the splits (``test`` when the data has one), the per-split reports printed before
    training, and whatever else the algorithm prepared before the model loads (``extras``)."""

    train: Any
    valid: Any | None
    reports: dict[str, Any]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    test: Any | None = None  # the test split, evaluated once at the end of training
