"""Stops for runs that can no longer learn, and warnings for settings that will not.

- :class:`DivergenceGuard`: the loss or the gradient norm is NaN/inf (diverged), or the
  gradient norm is exactly 0 for ``zero_grad_patience`` steps in a row while the loss still
  asks for a gradient (the trainable weights collapsed, e.g. ``--weight-decay 1e9``).
- :class:`UnscoredGuard` (online RL): every reward of ``patience`` generation batches in a row
  was None/NaN, so every advantage is 0 and the run trains on nothing.
- :func:`extreme_settings`: warnings printed before training for a learning rate or weight
  decay far outside what fine-tuning uses.

A stop is a :class:`TrainingStopped` naming the step, what was seen and what to change; the CLI
reports it in one line with exit code 2. Nothing is saved after the step that tripped it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# AdamW's decoupled decay multiplies every weight by (1 - lr * wd) each step.
MAX_SANE_LEARNING_RATE = 1e-2
MAX_SANE_WEIGHT_DECAY = 1.0
MAX_SANE_DECAY_PER_STEP = 1e-2


class TrainingStopped(RuntimeError):
    """The run was stopped because it cannot learn any more; the message says why."""


class DivergenceGuard:
    def __init__(self, cfg: Any) -> None:
        self.patience = int(getattr(cfg, "zero_grad_patience", 0))
        self.learning_rate = cfg.learning_rate
        self.weight_decay = cfg.weight_decay
        self.zero_steps = 0

    def check(self, step: int, loss: float, grad_norm: float,
              zero_grad_expected: bool = False) -> None:
        """After optimiser step ``step``. ``zero_grad_expected``: this step's loss carries no
        gradient by construction (online RL with every advantage 0 and no KL term)."""
        settings = (f"--learning-rate {self.learning_rate:g}, --weight-decay "
                    f"{self.weight_decay:g}")
        for name, value in (("loss", loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise TrainingStopped(
                    f"step {step}: the {name} is {value}: training diverged ({settings}); lower "
                    "the learning rate (or the weight decay) and start again from the last "
                    "checkpoint or a new --run-dir")
        if grad_norm == 0.0 and not zero_grad_expected:
            self.zero_steps += 1
        else:
            self.zero_steps = 0
        if self.patience and self.zero_steps >= self.patience:
            raise TrainingStopped(
                f"step {step}: the gradient norm has been exactly 0 for {self.zero_steps} steps "
                f"in a row: the trainable weights no longer learn ({settings}); lower the "
                "learning rate or the weight decay (--zero-grad-patience 0 turns this stop off)")


class UnscoredGuard:
    def __init__(self, patience: int, names: Sequence[str]) -> None:
        self.patience, self.names = int(patience), list(names)
        self.in_a_row = 0

    def check(self, step: int, total: np.ndarray) -> None:
        """After scoring the generation batch of ``step``; ``total`` holds its rewards."""
        self.in_a_row = self.in_a_row + 1 if np.isnan(np.asarray(total)).all() else 0
        if self.patience and self.in_a_row >= self.patience:
            raise TrainingStopped(
                f"step {step}: every reward of the last {self.in_a_row} generation batches was "
                f"None or NaN (reward functions: {', '.join(self.names)}), so every advantage "
                "is 0 and nothing is learned; check that the functions score these completions "
                "and get the columns they read (--unscored-patience 0 turns this stop off)")


def extreme_settings(cfg: Any) -> list[str]:
    """Warnings (one line each) for settings that will wreck the model, said before training."""
    out = []
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if lr > MAX_SANE_LEARNING_RATE:
        out.append(f"--learning-rate {lr:g} is far above fine-tuning rates (1e-6 to 1e-3); "
                   "expect the loss to diverge (the run stops if it does)")
    if wd > MAX_SANE_WEIGHT_DECAY or lr * wd >= MAX_SANE_DECAY_PER_STEP:
        out.append(f"--weight-decay {wd:g}: AdamW multiplies every trained weight by "
                   f"(1 - lr x wd) = {1 - lr * wd:.4g} each step, which wipes the weights out "
                   "(usual values: 0 to 0.1)")
    return out
