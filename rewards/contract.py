"""The reward-function contract: the callable's shape, its error type, and the model adapter.

A reward function is any callable

    fn(prompts, completions, **columns) -> list[float | None]

called once per batch, ``prompts`` and ``completions`` positionally, everything else by keyword. ``prompts`` and ``completions`` have one entry per completion (prompts are
repeated for each of the G completions of a group); a completion is a string, or a message list
``[{"role": "assistant", "content": text}]`` for chat data (``completion_text`` gives the text of
either). Every other dataset column arrives by name, as a list aligned with the completions; the
keywords ``completion_ids`` (``list[list[int]]``, unpadded) and ``step`` (the optimizer step, an
int) are always passed too, so a function should accept ``**kwargs``. ``None`` means "not
applicable to this sample": the sample's score is NaN and this function is ignored for it.
``async def`` functions are awaited concurrently with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

RewardFunction = Callable[..., Sequence[float | None]]
RESERVED_KWARGS = ("prompts", "completions", "completion_ids", "step")


class RewardError(Exception):
    """A reward function could not be loaded, raised, hung, or broke the contract.

    The message names the spec or function (and the sample index when known), so the user can act
    on it without a traceback."""


def reward_name(fn: Callable[..., Any]) -> str:
    """The metric name of a reward function: its ``__name__``, else its class name."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name else type(fn).__name__


CONTRACT_ARGUMENTS = ("prompts", "completions", "completion_ids", "step")


def required_columns(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Dataset columns a reward function cannot score without: its ``required_columns``
    attribute when it has one (factories set it: ``math_answer`` needs ``answer``), else the
    parameters of its signature that have no default, other than the contract's own."""
    declared = getattr(fn, "required_columns", None)
    if declared is not None:
        return tuple(declared)
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in list(params)[2:] if p.kind in kinds
                 and p.default is inspect.Parameter.empty and p.name not in CONTRACT_ARGUMENTS)


def completion_text(completion: Any) -> str:
    """Text of a completion: the string itself, or the last message's ``content`` of a message
    list (chat data). Anything else is an error the scorer reports with the function's name."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        # multimodal content: the concatenation of its text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError(f"a completion must be a string or a message list, got {type(completion)}")


def _plain_text(prompt: Any, completion: Any) -> str:
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt + completion
    messages = list(prompt if isinstance(prompt, (list, tuple)) else [])
    messages += list(completion if isinstance(completion, (list, tuple)) else [])
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


class ModelReward:
    """A reward model (a sequence-classification checkpoint) as a reward function.

    The backend that owns the model constructs it; this package never loads weights:

        ModelReward(score_texts=backend_scorer, name="rm_deberta",
                    format_text=lambda p, c: tok.apply_chat_template(p + c, tokenize=False))

    ``score_texts(texts) -> list[float]`` runs the classifier (TRL's ``logits[:, 0]``) on
    ``format_text(prompt, completion)`` for each sample; the default ``format_text`` concatenates
    strings, and joins ``role: content`` lines for message lists (backends should pass the chat
    template instead). ``load_reward("model:<path>", model_loader=...)`` hands ``<path>`` to the
    backend's loader, which returns one of these.
    """

    def __init__(self, score_texts: Callable[[list[str]], Sequence[float]], name: str,
                 format_text: Callable[[Any, Any], str] | None = None) -> None:
        self.score_texts = score_texts
        self.format_text = format_text or _plain_text
        self.__name__ = name
        self.__doc__ = f"Reward model {name}: score_texts(prompt + completion)."

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> list[float]:
        texts = [self.format_text(p, c) for p, c in zip(prompts, completions)]
        return [float(s) for s in self.score_texts(texts)]

    def __repr__(self) -> str:
        return f"ModelReward({self.__name__!r})"
