"""Reward functions of a run: loaded from ``--reward`` specs before any model loads.

Plain-Python rewards (built-ins, files, modules, entry points) are loaded and checked by
:func:`load_rewards` while the data is validated, so a typo fails in a second, not after the
model is up. ``model:<dir>`` rewards need the backend; their directory is checked early and the
model is built by :func:`build_scorer` with the backend's own loader. ``--overlong-buffer``
(DAPO's overlong reward shaping) appends ``soft_overlong_punishment(max_completion_length,
L_cache)`` with weight 1.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

MODEL_PREFIX = "model:"


def load_rewards(cfg: Any) -> list[tuple[str, Any]]:
    """``(spec, function or None)`` for every ``--reward``; None marks a reward model to build
    once the backend exists. Raises :class:`rewards.RewardError` naming the spec."""
    from rewards import RewardError, load_reward
    from rewards.code_exec import allow_weak_sandbox

    if getattr(cfg, "allow_weak_sandbox", False):
        allow_weak_sandbox()
    loaded: list[tuple[str, Any]] = []
    for spec in cfg.reward:
        if spec.strip().startswith(MODEL_PREFIX):
            path = Path(spec.strip()[len(MODEL_PREFIX):])
            if not (path / "config.json").is_file():
                raise RewardError(f"reward {spec!r}: {path} is not a model directory "
                                  "(no config.json)")
            loaded.append((spec, None))
        else:
            loaded.append((spec, load_reward(spec)))
    return loaded


def build_scorer(cfg: Any, loaded: list[tuple[str, Any]], backend: Any) -> Any:
    """The :class:`rewards.RewardScorer` of the run, reward models built on ``backend``."""
    from rewards import RewardScorer, load_reward
    from rewards.builtins import soft_overlong_punishment

    funcs = []
    for spec, fn in loaded:
        if fn is None:
            package = type(backend).__module__.split(".")[0]
            loader = importlib.import_module(f"{package}.reward_model").load_reward_model
            fn = load_reward(spec, loader)
        funcs.append(fn)
    weights = list(cfg.reward_weights) or [1.0] * len(funcs)
    if cfg.overlong_buffer_tokens:
        funcs.append(soft_overlong_punishment(cfg.max_completion_length,
                                              cfg.overlong_buffer_tokens))
        weights.append(1.0)
    return RewardScorer(funcs, [float(w) for w in weights], on_error=cfg.reward_on_error,
                        timeout_s=cfg.reward_timeout)
