"""Format rewards: a regex, XML-style tags, valid JSON, JSON matching a schema.

``format_regex`` and ``xml_tags`` are factories: they return a reward function whose ``__name__``
says what it checks (``xml_tags_think_answer``), which becomes the metric name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .contract import completion_text


def format_regex(pattern: str, name: str = "format_regex") -> Any:
    """Factory: 1.0 if ``re.search(pattern, text, re.DOTALL)`` matches the completion, else 0.0.

    Anchor the pattern (``^...$``) to require the whole completion to match. ``name`` is the
    metric name (default ``format_regex``)."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"1.0 if the completion matches the regex {pattern!r}, else 0.0."
    return reward


def xml_tags(*tags: str, partial: bool = False) -> Any:
    """Factory: 1.0 if the completion is exactly ``<t1>...</t1><t2>...</t2>...`` in this order.

    Whitespace is allowed around and between the blocks, anything inside them. With
    ``partial=True`` a completion that is not exact scores the fraction of tags that appear as
    exactly one ``<t>...</t>`` pair (0.5 for one of two). Default tags: ``think``, ``answer``.
    The reward's ``__name__`` is ``xml_tags_<t1>_<t2>...``."""
    tags = tags or ("think", "answer")
    for tag in tags:
        if not re.fullmatch(r"[A-Za-z_][\w\-.]*", tag):
            raise ValueError(f"xml_tags: {tag!r} is not a valid tag name")
    exact = re.compile(r"\s*" + r"\s*".join(
        rf"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in tags) + r"\s*", re.DOTALL)

    def score(text: str) -> float:
        if exact.fullmatch(text):
            return 1.0
        if not partial:
            return 0.0
        ok = sum(text.count(f"<{t}>") == 1 and text.count(f"</{t}>") == 1
                 and text.index(f"<{t}>") < text.index(f"</{t}>") for t in tags)
        return ok / len(tags)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [score(completion_text(c)) for c in completions]

    reward.__name__ = reward.__qualname__ = "xml_tags_" + "_".join(tags)
    reward.__doc__ = f"1.0 if the completion is exactly the tags {', '.join(tags)} in order."
    return reward


def _json_text(text: str) -> str:
    """The last ```json (or plain ```) fenced block, else the whole text, stripped."""
    blocks = re.findall(r"```(?:json)?[ \t]*\n(.*?)```", text, re.DOTALL)
    return (blocks[-1] if blocks else text).strip()


def _parse(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(_json_text(text))
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_valid(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion (or its last ```json block) parses as JSON, else 0.0."""
    return [float(_parse(completion_text(c))[0]) for c in completions]


def _validator_for(schema: Any) -> Any:
    try:
        import jsonschema
    except ImportError:
        raise ImportError("json_schema needs the jsonschema package: "
                          "pip install 'jsonschema>=4'") from None
    if isinstance(schema, str):
        schema = json.loads(schema)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def json_schema(schema: dict | str | None = None, column: str = "schema") -> Any:
    """Factory: 1.0 if the completion's JSON validates against a JSON Schema, else 0.0.

    The schema is ``schema`` when given (a dict or JSON text), else the sample's ``column`` entry
    (dict or JSON text; None there, or no such column -> None for that sample). Text that is not
    JSON scores 0.0; a malformed schema raises. Needs ``jsonschema`` (any draft it knows)."""
    fixed = None if schema is None else _validator_for(schema)

    def reward(prompts: Sequence[Any], completions: Sequence[Any],
               **kwargs: Any) -> list[float | None]:
        schemas = kwargs.get(column)
        scores: list[float | None] = []
        for i, c in enumerate(completions):
            if fixed is None and (schemas is None or schemas[i] is None):
                scores.append(None)
                continue
            validator = fixed or _validator_for(schemas[i])
            ok, value = _parse(completion_text(c))
            scores.append(float(ok and validator.is_valid(value)))
        return scores

    reward.__name__ = reward.__qualname__ = "json_schema"
    reward.required_columns = () if fixed is not None else (column,)
    reward.__doc__ = "1.0 if the completion's JSON validates against the schema, else 0.0."
    return reward
