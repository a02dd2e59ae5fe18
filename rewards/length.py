"""Length rewards, from the completion's token count ``|y| = len(completion_ids[i])``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _lengths(completion_ids: Sequence[Sequence[int]] | None, who: str) -> list[int]:
    if completion_ids is None:
        raise ValueError(f"{who} needs completion_ids (token ids of each completion)")
    return [len(ids) for ids in completion_ids]


def length_penalty(max_tokens: int) -> Any:
    """Factory: ``r = -min(|y|, max_tokens) / max_tokens``, in [-1, 0].

    A linear pressure towards short answers; combine it with a small weight. ``max_tokens`` is
    usually the generation limit."""
    if max_tokens <= 0:
        raise ValueError(f"length_penalty: max_tokens must be > 0, got {max_tokens}")

    def reward(prompts: Sequence[Any], completions: Sequence[Any],
               completion_ids: Sequence[Sequence[int]] | None = None,
               **kwargs: Any) -> list[float]:
        return [-min(n, max_tokens) / max_tokens
                for n in _lengths(completion_ids, "length_penalty")]

    reward.__name__ = reward.__qualname__ = "length_penalty"
    reward.__doc__ = f"-min(|y|, {max_tokens}) / {max_tokens}"
    return reward


def soft_overlong_punishment(max_length: int, buffer: int) -> Any:
    """Factory: DAPO's soft overlong punishment: 0, then linear down to -1 near the length limit.

    Yu et al. 2025, Eq. 13, with L_max = ``max_length`` and L_cache = ``buffer``:

        R_len = 0                              if |y| <= L_max - L_cache
        R_len = (L_max - L_cache - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
        R_len = -1                             if |y| > L_max

    Paper values: L_max = 20480, L_cache = 4096. Same as TRL's ``get_soft_overlong_punishment``."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"soft_overlong_punishment: need 0 < buffer <= max_length, got "
                         f"buffer={buffer}, max_length={max_length}")
    free = max_length - buffer

    def score(n: int) -> float:
        if n <= free:
            return 0.0
        return (free - n) / buffer if n <= max_length else -1.0

    def reward(prompts: Sequence[Any], completions: Sequence[Any],
               completion_ids: Sequence[Sequence[int]] | None = None,
               **kwargs: Any) -> list[float]:
        return [score(n) for n in _lengths(completion_ids, "soft_overlong_punishment")]

    reward.__name__ = reward.__qualname__ = "soft_overlong_punishment"
    reward.__doc__ = f"DAPO soft overlong punishment, L_max={max_length}, L_cache={buffer}."
    return reward
