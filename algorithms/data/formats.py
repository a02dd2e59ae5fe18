"""Dataset formats and the rules each example must follow (checked before any tokenisation).

Formats (detected per example; one file holds one format, the first example's):

- ``text``: ``{"text": str}`` -- language modelling.
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` -- no chat template.
- ``chat_prompt_completion``: ``{"prompt": [messages], "completion": [messages]}``.
- ``messages``: ``{"messages": [messages]}`` -- multi-turn chat.

A message is ``{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}``; other message
keys (``tool_calls``, ``name``, ``tool_call_id``, ``reasoning_content`` ...) are passed to the chat
template untouched. ``content`` may be null or absent only in an assistant turn with
``tool_calls``; every tool call names its function (``{"function": {"name": ...}}`` or
``{"name": ...}``). An assistant turn of ``messages`` data may carry ``"weight": 0`` (not
trained) or ``1`` (trained, the default), as in OpenAI's fine-tuning format; anywhere else, or
with another value, ``weight`` is an error, never ignored. Chat formats also take ``tools`` (a list of objects, given to the template) and
``chat_template_kwargs`` (an object of extra template variables). Every format passes ``id`` and
``meta`` through unused (datasets often carry them). Any other top-level key is an error: it
would be ignored silently, which usually means a typo or a format mix-up.

Rules, by the identifier that ``--skip-invalid`` counts them under: ``invalid_json``,
``not_an_object`` (see :mod:`.records`), ``unknown_format``, ``ambiguous_format``,
``mixed_formats``, ``missing_key``, ``wrong_type``, ``unknown_key``, ``empty_text``,
``empty_prompt``, ``empty_completion``, ``bad_message``, ``unknown_role``, ``content_not_string``,
``bad_tool_call``, ``bad_weight``, ``no_assistant_turn``; and, found while tokenising (:mod:`.tokenize`), ``template_error``,
``template_not_prefix_stable``, ``fully_masked``.
"""

from __future__ import annotations

import difflib
from typing import Any

from .records import Record, describe, kind_of

TEXT = "text"
PROMPT_COMPLETION = "prompt_completion"
CHAT_PROMPT_COMPLETION = "chat_prompt_completion"
MESSAGES = "messages"
CHAT_FORMATS = (CHAT_PROMPT_COMPLETION, MESSAGES)

ROLES = ("system", "user", "assistant", "tool")
PASSTHROUGH_KEYS = ("id", "meta")
FORMAT_KEYS = {
    TEXT: ("text",),
    PROMPT_COMPLETION: ("prompt", "completion"),
    CHAT_PROMPT_COMPLETION: ("prompt", "completion", "tools", "chat_template_kwargs"),
    MESSAGES: ("messages", "tools", "chat_template_kwargs"),
}
FORMAT_NAMES = {
    TEXT: '"text"',
    PROMPT_COMPLETION: '"prompt"/"completion" strings',
    CHAT_PROMPT_COMPLETION: '"prompt"/"completion" message lists',
    MESSAGES: '"messages"',
}


def detect_format(record: Record) -> str:
    """The format of one example, from its keys and value types (raises on no / two formats)."""
    data = record.data
    keys = [k for k in ("text", "prompt", "completion", "messages") if k in data]
    if not keys:
        raise record.fail("unknown_format", 'an example needs "text", "prompt" and "completion", '
                          f'or "messages"; got keys {_key_list(data)}')
    has_pc = "prompt" in data or "completion" in data
    if ("messages" in data) + ("text" in data) + has_pc > 1:
        raise record.fail("ambiguous_format", "an example has exactly one of \"text\", "
                          f"\"prompt\"/\"completion\" or \"messages\"; got keys {_key_list(data)}")
    if "text" in data:
        return TEXT
    if "messages" in data:
        return MESSAGES
    for have, need in (("prompt", "completion"), ("completion", "prompt")):
        if have in data and need not in data:
            raise record.fail("missing_key", f'has "{have}" but no "{need}"')
    prompt, completion = data["prompt"], data["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return PROMPT_COMPLETION
    if isinstance(prompt, list) and isinstance(completion, list):
        return CHAT_PROMPT_COMPLETION
    raise record.fail("wrong_type", '"prompt" and "completion" must both be strings or both be '
                      f"message lists; got {kind_of(prompt)} and {kind_of(completion)}")


def check_format_and_keys(record: Record, fmt: str, expected: str | None, first_source: str,
                          format_keys: dict, format_names: dict) -> None:
    """Rules ``mixed_formats`` (one file holds one format) and ``unknown_key`` (a key that would
    be ignored), shared by the SFT and preference formats."""
    if expected is not None and fmt != expected:
        raise record.fail("mixed_formats", f"this example is {format_names[fmt]} but the file's "
                          f"first example ({first_source}) is {format_names[expected]}; one file "
                          "holds one format")
    allowed = format_keys[fmt] + PASSTHROUGH_KEYS
    for key in record.data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise record.fail("unknown_key", f"unknown key {key!r}{hint} would be ignored; a "
                              f"{format_names[fmt]} example takes {', '.join(format_keys[fmt])} "
                              f"(and passes {', '.join(PASSTHROUGH_KEYS)} through unused)")


def check_record(record: Record, expected: str | None = None,
                 first_source: str = "") -> str:
    """Validate one example against its format's rules; return the format.

    ``expected`` is the file's format (the first valid example's); a different one raises
    ``mixed_formats`` naming both lines.
    """
    if record.error is not None:
        raise record.error
    fmt = detect_format(record)
    check_format_and_keys(record, fmt, expected, first_source, FORMAT_KEYS, FORMAT_NAMES)
    data = record.data
    if fmt == TEXT:
        _check_text(record, data["text"], "text", "empty_text")
    elif fmt == PROMPT_COMPLETION:
        _check_text(record, data["completion"], "completion", "empty_completion")
    elif fmt == CHAT_PROMPT_COMPLETION:
        if not data["prompt"]:
            raise record.fail("empty_prompt", '"prompt" is an empty message list')
        if not data["completion"]:
            raise record.fail("empty_completion", '"completion" is an empty message list')
        _check_messages(record, data["prompt"], "prompt")
        _check_messages(record, data["completion"], "completion")
        _require_assistant(record, data["completion"], "completion")
    else:
        if not isinstance(data["messages"], list):
            raise record.fail("wrong_type", '"messages" must be a list of {"role", "content"} '
                              f"objects; got {describe(data['messages'])}")
        _check_messages(record, data["messages"], "messages", weights=True)
        _require_assistant(record, data["messages"], "messages")
        if all(m.get("weight", 1) == 0 for m in data["messages"] if m["role"] == "assistant"):
            raise record.fail("no_assistant_turn", 'every assistant turn of "messages" has '
                              '"weight": 0, so nothing would be trained')
    if fmt in CHAT_FORMATS:
        _check_chat_extras(record, data)
    return fmt


def _check_text(record: Record, value: Any, key: str, empty_rule: str) -> None:
    if not isinstance(value, str):
        raise record.fail("wrong_type", f'"{key}" must be a string; got {describe(value)}')
    if not value.strip():
        raise record.fail(empty_rule, f'"{key}" is empty; got {describe(value)}')


def _check_messages(record: Record, messages: list, key: str, weights: bool = False) -> None:
    if not messages:
        raise record.fail("wrong_type", f'"{key}" is an empty message list')
    for i, message in enumerate(messages):
        where = f'"{key}"[{i}]'
        if not isinstance(message, dict) or "role" not in message:
            raise record.fail("bad_message", f'{where} must be an object with "role" and '
                              f'"content"; got {describe(message)}')
        role = message["role"]
        if role not in ROLES:
            raise record.fail("unknown_role", f'{where} has role {describe(role)}; expected one '
                              f"of {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list)
                                      and all(isinstance(c, dict) for c in calls)):
            raise record.fail("wrong_type", f'{where} "tool_calls" must be a list of objects; '
                              f"got {describe(calls)}")
        for j, call in enumerate(calls or []):
            function = call.get("function", call)
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name.strip():
                raise record.fail("bad_tool_call", f'{where} "tool_calls"[{j}] does not name its '
                                  f'function (expected {{"function": {{"name": ..., "arguments": '
                                  f"...}}}}); got {describe(call)}")
        if "weight" in message:
            weight = message["weight"]
            if not (weights and role == "assistant"):
                raise record.fail("bad_weight", f'{where} has "weight", which only an assistant '
                                  'turn of "messages" data may carry (0 = not trained)')
            if isinstance(weight, bool) or weight not in (0, 1):
                raise record.fail("bad_weight", f'{where} "weight" must be 0 (not trained) or 1 '
                                  f"(trained); got {describe(weight)}")
        content = message.get("content")
        if role == "assistant" and calls and content is None:
            continue  # a pure tool-call turn
        if "content" not in message:
            raise record.fail("missing_key", f'{where} has no "content" (only an assistant turn '
                              'with "tool_calls" may omit it)')
        if not isinstance(content, str):
            raise record.fail("content_not_string", f'{where} "content" must be a string; got '
                              f"{describe(content)}")


def _require_assistant(record: Record, messages: list, key: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise record.fail("no_assistant_turn", f'"{key}" has no assistant turn, so nothing '
                          f"would be trained; got roles {roles}")


def _check_chat_extras(record: Record, data: dict) -> None:
    tools = data.get("tools")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise record.fail("wrong_type", f'"tools" must be a list of objects; got {describe(tools)}')
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise record.fail("wrong_type", '"chat_template_kwargs" must be an object; got '
                          f"{describe(kwargs)}")


def _key_list(data: dict) -> str:
    return "[" + ", ".join(repr(k) for k in data) + "]"

