"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay.

For optimiser step ``s`` (0-based) of ``S`` with ``W`` warm-up steps, peak ``lr`` and floor
``r = min_lr_ratio``:

- warm-up (``s < W``): ``lr * (s + 1) / W``
- then, with ``p = (s - W) / max(1, S - W - 1)`` clipped to [0, 1]:
  constant ``lr``; linear ``lr * (1 - (1 - r) * p)``; cosine ``lr * (r + (1 - r) * (1 + cos(pi p)) / 2)``
"""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, peak: float, schedule: str = "constant",
                  warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)))
    if schedule == "linear":
        return peak * (1.0 - (1.0 - min_lr_ratio) * progress)
    if schedule == "cosine":
        return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected constant, linear or cosine")
