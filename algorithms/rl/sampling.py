"""Rollout sampling, backend-free: the parameters, the result, and the rules that end a completion.

Both backends sample with the same filter chain, in transformers' order: divide the logits by
``temperature``, keep the ``top_k`` most likely tokens, keep the smallest set whose probability
reaches ``top_p`` (nucleus), drop tokens whose probability is below ``min_p`` times the most likely
one, then draw from what is left, renormalised. Greedy decoding is ``top_k=1`` (temperature 0 is
refused: the log-probs of the loss are taken under ``softmax(logits / temperature)``).

Sampling itself is the backend's (``Backend.sample``); what a completion *is* is decided here, once,
by :func:`finish`, so the backends cannot disagree about it:

- it ends at the first EOS id (any of :func:`stop_token_ids`), the EOS token kept in ``ids``;
- or at the token where a stop string first appears in the decoded text, if that comes first:
  ``ids`` keep every token up to and including that one, ``text`` is cut right after the stop
  string (the stop string is KEPT in ``text``, so format rewards can see a closing tag);
- or, with neither, at ``max_tokens`` (``finish_reason="length"``, ``truncated``).

``text`` is the decoded completion with special tokens skipped (so the EOS never shows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FINISH_REASONS = ("eos", "stop", "length")
# which model samples (``SamplingParams.source``; see ``Backend.sample``)
SOURCES = ("policy", "reference", "mixture", "teacher")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample rollouts; validated on creation (each error names the field and value)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0 = off
    min_p: float = 0.0      # 0 = off
    stop: tuple[str, ...] = ()   # stop strings
    batch_size: int = 0     # sequences sampled at once (0 = all); the rollout-memory knob
    source: str = "policy"  # policy | reference | mixture | teacher (Backend.sample)
    mixture_coef: float = 0.5  # source "mixture": weight c of the reference's log-probs

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}: must be > 0 "
                             "(for greedy decoding use top_k=1)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}: must be in [0, 1] (0 = off)")
        if not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise ValueError(f"batch_size={self.batch_size!r}: must be an integer >= 0 "
                             "(0 = every sequence at once)")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: must be one of {', '.join(SOURCES)}")
        if not 0 <= self.mixture_coef <= 1:
            raise ValueError(f"mixture_coef={self.mixture_coef!r}: must be in [0, 1]")
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")


@dataclasses.dataclass
class Completion:
    """One sampled completion, ended by :func:`finish`."""

    ids: list[int]      # completion token ids, with the EOS it ended on; trimmed after a stop
    text: str           # decoded, special tokens skipped, cut right after a stop string
    finish_reason: str  # "eos" | "stop" | "length"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as lists of ints; ValueError naming the first empty one."""
    out = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    return out


def chunks(n: int, batch_size: int) -> list[range]:
    """Index ranges of at most ``batch_size`` sequences (all ``n`` at once when 0)."""
    size = batch_size or max(n, 1)
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# --- stop tokens ---------------------------------------------------------------------------

def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``...), or None without a template or such a token."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "rollout-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        # a template that refuses a closing assistant turn: nothing to learn from it
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    tail = text[text.rindex(marker) + len(marker):].lstrip(" ")
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = ids[0] in set(getattr(tokenizer, "all_special_ids", ()))
    special = special or (ids[0] in added and getattr(added[ids[0]], "special", False))
    return int(ids[0]) if special else None


def _config_eos(model_dir: str | Path | None) -> list[int]:
    found: list[int] = []
    if model_dir is None:
        return found
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        found += [value] if isinstance(value, int) else [v for v in value or [] if
                                                          isinstance(v, int)]
    return found


def stop_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """Every token id that ends a completion, in this order without repeats: the tokenizer's
    ``eos_token_id``, the chat template's end-of-turn token, and the ``eos_token_id`` of the
    model dir's ``config.json`` / ``generation_config.json``. Both backends call this with the
    same tokenizer and model dir, so they stop on the same ids. ValueError if there is none."""
    candidates = [getattr(tokenizer, "eos_token_id", None), end_of_turn_id(tokenizer),
                  *_config_eos(model_dir)]
    out = tuple(dict.fromkeys(int(t) for t in candidates if t is not None))
    if not out:
        raise ValueError("the tokenizer and model config name no EOS token: a completion could "
                         "only end at max_tokens; set the tokenizer's eos_token")
    return out


# --- ending a completion -------------------------------------------------------------------

def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _stop_end(text: str, stops: Sequence[str]) -> int | None:
    """Character offset just after the earliest-ending stop string in ``text``, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def _stop_token_index(ids: list[int], tokenizer: Any, stops: Sequence[str]) -> int | None:
    """The smallest ``k`` such that ``decode(ids[:k + 1])`` contains a stop string, or None.

    A decoded prefix is a prefix of every longer one (bar an incomplete character at its end), so
    "contains a stop string" is monotone in ``k``: binary search, O(log n) decodes, not n.
    """
    if not ids or _stop_end(_decode(tokenizer, ids), stops) is None:
        return None
    lo, hi = 0, len(ids) - 1   # invariant: the prefix ending at hi contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _stop_end(_decode(tokenizer, ids[:mid + 1]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return hi


def finish(ids: Sequence[int], tokenizer: Any, params: SamplingParams,
           eos_ids: Sequence[int]) -> Completion:
    """The completion a backend's raw sampled ``ids`` stand for (rules in the module docstring).

    ``ids`` may run past the end (tokens after an EOS or a stop string, padding, more than
    ``max_tokens``): everything after the end is dropped. Guarantees: ``len(ids) <=
    max_tokens``; an ``"eos"`` completion's last id is an EOS id and no earlier one is; a
    ``"stop"`` completion's ``text`` ends with a stop string, the only occurrence of one in it,
    and no shorter prefix of its ``ids`` decodes to a stop string; ``"length"`` means neither
    happened.
    """
    ids = [int(t) for t in ids[:params.max_tokens]]
    eos = {int(e) for e in eos_ids}
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if end is None else ids[:end]
    if params.stop:
        k = _stop_token_index(body, tokenizer, params.stop)
        if k is not None:
            text = _decode(tokenizer, body[:k + 1])
            return Completion(body[:k + 1], text[:_stop_end(text, params.stop)], "stop")
    if end is not None:
        return Completion(ids[:end + 1], _decode(tokenizer, ids[:end + 1]), "eos")
    return Completion(ids, _decode(tokenizer, ids), "length")


class StopStringWatch:
    """Early exit for stop strings during decoding: ``seen(ids)`` decodes only the last few
    tokens and says whether a stop string shows there. It is a hint to stop sampling a sequence
    early; :func:`finish` alone decides where the completion ends."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        # a token decodes to >= 1 byte and a character is <= 4 bytes; + slack for specials
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.stops)

    def seen(self, ids: Sequence[int]) -> bool:
        if not self.stops or not ids:
            return False
        tail = _decode(self.tokenizer, list(ids[-self.window:]))
        return any(s in tail for s in self.stops)
