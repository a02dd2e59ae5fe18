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
            from converters.models import resolve_model

            try:  # a model dir or a Hub id (the cache first), checked before any model loads
                resolve_model(spec.strip()[len(MODEL_PREFIX):])
            except (FileNotFoundError, ValueError, ImportError) as e:
                raise RewardError(f"reward {spec!r}: {e}") from None
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
            fn = load_reward(spec, _resolving(
                importlib.import_module(f"{package}.reward_model").load_reward_model))
        funcs.append(fn)
    weights = list(cfg.reward_weights) or [1.0] * len(funcs)
    if cfg.overlong_buffer_tokens:
        funcs.append(soft_overlong_punishment(cfg.max_completion_length,
                                              cfg.overlong_buffer_tokens))
        weights.append(1.0)
    return RewardScorer(funcs, [float(w) for w in weights], on_error=cfg.reward_on_error,
                        timeout_s=cfg.reward_timeout)


def _resolving(load_reward_model: Any) -> Any:
    """The backend's reward-model loader, given a local dir for a Hub id or known name."""
    from converters.models import resolve_model

    def load(name: str, *args: Any, **kwargs: Any) -> Any:
        return load_reward_model(str(resolve_model(name)), *args, **kwargs)

    return load
