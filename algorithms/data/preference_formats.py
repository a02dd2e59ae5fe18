"""Preference data formats and their validation rules (see :mod:`.preference` for the formats).

Each rule raises ``record.fail(rule, ...)`` so the message names ``file:line``; ``--skip-invalid``
counts examples by these rule names.
"""

from __future__ import annotations

from typing import Any

from .formats import (
    _check_chat_extras,
    _check_messages,
    check_format_and_keys,
)
from .records import Record, describe, kind_of

PREF_STRING = "pref_string"
PREF_CHAT = "pref_chat"
PREF_IMPLICIT_STRING = "pref_implicit_string"
PREF_IMPLICIT_CHAT = "pref_implicit_chat"
KTO_STRING = "kto_string"
KTO_CHAT = "kto_chat"
PAIRED_FORMATS = (PREF_STRING, PREF_CHAT, PREF_IMPLICIT_STRING, PREF_IMPLICIT_CHAT)
UNPAIRED_FORMATS = (KTO_STRING, KTO_CHAT)
CHAT = (PREF_CHAT, PREF_IMPLICIT_CHAT, KTO_CHAT)
KINDS = ("paired", "unpaired")
CHAT_EXTRAS = ("tools", "chat_template_kwargs")
FORMAT_KEYS = {
    PREF_STRING: ("prompt", "chosen", "rejected"),
    PREF_CHAT: ("prompt", "chosen", "rejected") + CHAT_EXTRAS,
    PREF_IMPLICIT_STRING: ("chosen", "rejected"),
    PREF_IMPLICIT_CHAT: ("chosen", "rejected") + CHAT_EXTRAS,
    KTO_STRING: ("prompt", "completion", "label"),
    KTO_CHAT: ("prompt", "completion", "label") + CHAT_EXTRAS,
}
FORMAT_NAMES = {
    PREF_STRING: '"prompt"/"chosen"/"rejected" strings',
    PREF_CHAT: '"prompt"/"chosen"/"rejected" message lists',
    PREF_IMPLICIT_STRING: '"chosen"/"rejected" strings (implicit prompt)',
    PREF_IMPLICIT_CHAT: '"chosen"/"rejected" conversations (implicit prompt)',
    KTO_STRING: '"prompt"/"completion"/"label" strings',
    KTO_CHAT: '"prompt"/"completion"/"label" message lists',
}


# ---------------------------------------------------------------------------------------------
# Validation


def detect_preference_format(record: Record) -> str:
    """The preference format of one example from its keys and value types (see module doc)."""
    data = record.data
    paired = [k for k in ("chosen", "rejected") if k in data]
    kto = [k for k in ("completion", "label") if k in data]
    if paired and kto:
        raise record.fail("ambiguous_format", 'an example is either paired ("chosen"/"rejected") '
                          f'or unpaired ("completion"/"label"); got keys {_keys(data)}')
    if paired:
        for have, need in (("chosen", "rejected"), ("rejected", "chosen")):
            if have in data and need not in data:
                raise record.fail("missing_key", f'has "{have}" but no "{need}"')
        sides = ([("prompt", data["prompt"])] if "prompt" in data else []) + [
            ("chosen", data["chosen"]), ("rejected", data["rejected"])]
        string, chat = ((PREF_STRING, PREF_CHAT) if "prompt" in data
                        else (PREF_IMPLICIT_STRING, PREF_IMPLICIT_CHAT))
    elif kto:
        for need in ("prompt", "completion", "label"):
            if need not in data:
                raise record.fail("missing_key", f'an unpaired example needs "prompt", '
                                  f'"completion" and "label"; "{need}" is missing')
        sides = [("prompt", data["prompt"]), ("completion", data["completion"])]
        string, chat = KTO_STRING, KTO_CHAT
    else:
        raise record.fail("unknown_format", 'a preference example needs "chosen" and "rejected" '
                          '(and optionally "prompt"), or "prompt", "completion" and "label"; '
                          f"got keys {_keys(data)}")
    if all(isinstance(v, str) for _, v in sides):
        return string
    if all(isinstance(v, list) for _, v in sides):
        return chat
    got = ", ".join(f'"{k}" {kind_of(v)}' for k, v in sides)
    raise record.fail("wrong_type", f"{' / '.join(k for k, _ in sides)} must all be strings or "
                      f"all be message lists; got {got}")


def check_preference_record(record: Record, kind: str = "paired", expected: str | None = None,
                            first_source: str = "") -> str:
    """Validate one example (see module doc for the rules); return its format."""
    if record.error is not None:
        raise record.error
    fmt = detect_preference_format(record)
    if kind == "paired" and fmt in UNPAIRED_FORMATS:
        raise record.fail("unpaired_data", f"this is unpaired (KTO) data ({FORMAT_NAMES[fmt]}); "
                          'a paired algorithm needs "chosen" and "rejected"')
    check_format_and_keys(record, fmt, expected, first_source, FORMAT_KEYS, FORMAT_NAMES)
    data = record.data
    responses = ("completion",) if fmt in UNPAIRED_FORMATS else ("chosen", "rejected")
    if fmt in UNPAIRED_FORMATS and not isinstance(data["label"], bool):
        raise record.fail("wrong_type", '"label" must be true (desirable) or false '
                          f"(undesirable); got {describe(data['label'])}")
    if fmt in CHAT:
        if "prompt" in data:
            if not data["prompt"]:
                raise record.fail("empty_prompt", '"prompt" is an empty message list')
            _check_messages(record, data["prompt"], "prompt")
        for key in responses:
            if not data[key]:
                raise record.fail("empty_completion", f'"{key}" is an empty message list')
            _check_messages(record, data[key], key)
        _check_chat_extras(record, data)
    else:
        for key in responses:
            if not data[key].strip():
                raise record.fail("empty_completion", f'"{key}" is empty; got '
                                  f"{describe(data[key])}")
    if fmt in PAIRED_FORMATS and data["chosen"] == data["rejected"]:
        raise record.fail("chosen_equals_rejected", '"chosen" and "rejected" are identical, so '
                          f"the pair carries no preference; got {describe(data['chosen'])}")
    for name, _, response in split_record(record, fmt):
        if fmt in CHAT and response[0]["role"] != "assistant":
            where = "after the common prefix " if fmt == PREF_IMPLICIT_CHAT else ""
            raise record.fail("response_not_assistant", f'the "{name}" response {where}must '
                              "start with an assistant turn; got role "
                              f"{describe(response[0]['role'])}")
    return fmt


def split_record(record: Record, fmt: str) -> list[tuple[str, Any, Any]]:
    """``[(side, prompt, response)]`` of a validated example: two sides (paired) or one."""
    data = record.data
    if fmt in UNPAIRED_FORMATS:
        return [("completion", data["prompt"], data["completion"])]
    chosen, rejected = data["chosen"], data["rejected"]
    if fmt in (PREF_STRING, PREF_CHAT):
        return [("chosen", data["prompt"], chosen), ("rejected", data["prompt"], rejected)]
    n = common_prefix_length(chosen, rejected)
    if fmt == PREF_IMPLICIT_STRING:
        n = _word_boundary(chosen, n)
    if n == 0:
        what = ("no common prefix ending before whitespace" if fmt == PREF_IMPLICIT_STRING
                else "their first messages differ")
        raise record.fail("no_common_prefix", f'"chosen" and "rejected" share no prompt ({what})'
                          '; give the prompt explicitly as "prompt"')
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value[n:]:
            raise record.fail("empty_completion", f'"{name}" is the common prefix itself, so '
                              "its response is empty")
    return [("chosen", chosen[:n], chosen[n:]), ("rejected", rejected[:n], rejected[n:])]


def common_prefix_length(a: str | list, b: str | list) -> int:
    """Length of the longest common prefix (characters of strings, or equal leading messages)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _word_boundary(text: str, n: int) -> int:
    """``n`` moved back to the last whitespace at or before it, so the response starts there."""
    while n > 0 and not text[n - 1].isspace():
        n -= 1
    while n > 0 and text[n - 1].isspace():
        n -= 1
    return n


def _keys(data: dict) -> str:
    return "[" + ", ".join(repr(k) for k in data) + "]"
