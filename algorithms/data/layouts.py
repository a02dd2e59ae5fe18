"""Row layouts: ShareGPT, Alpaca and column mappings, turned into the formats the data layer reads.

Every row goes through ``--columns`` (``target=source`` renames), then its layout, then the usual
format rules (:mod:`.formats`, :mod:`.preference_formats`, :mod:`algorithms.rl.data`). The
conversions are exact, so a ShareGPT or Alpaca row gives the same tokens and loss mask as the
equivalent ``messages`` (or preference / prompt) row:

- ShareGPT: ``{"conversations": [{"from": "human", "value": ...}, ...], "system"?, "tools"?}``.
  Roles: human / user -> user; gpt / assistant / model / chatgpt / bard / bing -> assistant;
  system -> system; tool / observation / function / ipython -> tool; function_call -> an
  assistant tool call (its value is JSON ``{"name", "arguments"}`` or a list of them). Turns may
  also use ``role`` / ``content``; other turn keys pass through. ``system`` becomes a leading
  system message; ``tools`` (a list, or a JSON string of one) is given to the template.
  Preference rows add ``chosen`` / ``rejected`` (a turn, a list of turns or a string: the
  assistant reply); KTO rows add ``label`` (the last turn is the completion); prompt rows are the
  conversation.
- Alpaca: ``{"instruction", "input"?, "output", "system"?, "history"?}`` -> messages: system,
  each ``[query, reply]`` of ``history``, then user ``instruction + "\\n" + input`` (just the
  instruction when ``input`` is empty) and assistant ``output``. Preference rows have
  ``chosen`` / ``rejected`` strings instead of ``output``; KTO rows add ``label``; prompt rows
  stop at the user turn (``output`` stays a column the rewards can read).

Which columns are read: rows of JSON / JSONL files in the default layout keep today's strict
rule (a key no format reads is ``unknown_key``, usually a typo). Table sources (parquet, arrow,
CSV, save_to_disk, Hub), ``--columns`` and an explicit ``--data-format`` *select*: the columns
the format reads are taken (``messages`` before ``prompt``/``completion`` before ``text``) and
the others are ignored and listed in the report; a top-level null is an absent column there.
Online-RL prompt data keeps every column: each one reaches the reward functions.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .records import DataError, Record, describe

NATIVE, SHAREGPT, ALPACA = "native", "sharegpt", "alpaca"
PASSTHROUGH = ("id", "meta")
CHAT_EXTRAS = ("tools", "chat_template_kwargs")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system", "tool": "tool", "observation": "tool", "function": "tool",
    "ipython": "tool", "function_call": "assistant",
}
# --data-format values each family takes, and the native format each one selects.
FAMILY_FORMATS = {
    "sft": ("auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca"),
    "paired": ("auto", "preference", "sharegpt", "alpaca"),
    "unpaired": ("auto", "preference", "kto", "sharegpt", "alpaca"),
    "prompt": ("auto", "prompt", "messages", "sharegpt", "alpaca"),
}
FAMILY_NAMES = {"sft": "supervised fine-tuning", "paired": "paired preference",
                "unpaired": "KTO", "prompt": "online RL (prompt)"}
NATIVE_KEYS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion") + CHAT_EXTRAS,
    "messages": ("messages",) + CHAT_EXTRAS,
    "preference": ("prompt", "chosen", "rejected") + CHAT_EXTRAS,
    "kto": ("prompt", "completion", "label") + CHAT_EXTRAS,
}
LAYOUT_KEYS = {
    SHAREGPT: ("conversations", "system", "tools", "chat_template_kwargs"),
    ALPACA: ("instruction", "input", "output", "system", "history"),
}
RESPONSE_KEYS = {"sft": (), "paired": ("chosen", "rejected"),
                 "unpaired": ("chosen", "rejected", "label"), "prompt": ()}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one source's rows become rows of a ``family``'s formats (see module doc)."""

    family: str
    name: str = NATIVE
    format: str = "auto"      # the --data-format asked for
    columns: tuple[tuple[str, str], ...] = ()
    select: bool = False
    conversation_key: str = "conversations"

    def apply(self, record: Record) -> Record:
        """The row in the family's own format (same source), or ``record.fail(...)``."""
        if record.error is not None:
            raise record.error
        data = _rename(record, self.columns)
        if self.name == SHAREGPT:
            data = self._sharegpt(record, data)
        elif self.name == ALPACA:
            data = self._alpaca(record, data)
        elif self.select:
            data = self._select(record, data)
        return dataclasses.replace(record, data=data)

    # --- native rows -----------------------------------------------------------------------
    def _select(self, record: Record, data: dict) -> dict:
        if self.family == "prompt":
            if self.format == "messages" and "messages" in data:
                data = {"prompt": data["messages"],
                        **{k: v for k, v in data.items() if k not in ("messages", "prompt")}}
            return data
        present = {k: v for k, v in data.items() if v is not None}
        keep = NATIVE_KEYS.get(self.format) or _auto_keys(self.family, present)
        if keep is None:
            nulls = [k for k, v in data.items() if v is None]
            if nulls and _auto_keys(self.family, data) is not None:
                raise record.fail("missing_key", f"{', '.join(map(repr, nulls))} "
                                  f"{'is' if len(nulls) == 1 else 'are'} null in this row")
            return present  # no format fits: the format rules name the keys
        if self.family == "unpaired" and self.format == "preference":
            keep = NATIVE_KEYS["preference"] if "chosen" in present else NATIVE_KEYS["kto"]
        return {k: v for k, v in present.items() if k in keep + PASSTHROUGH}

    # --- ShareGPT --------------------------------------------------------------------------
    def _sharegpt(self, record: Record, data: dict) -> dict:
        key = self.conversation_key
        allowed = (key,) + LAYOUT_KEYS[SHAREGPT][1:] + RESPONSE_KEYS[self.family]
        rest = self._leftover(record, data, allowed, "a ShareGPT row")
        if data.get(key) is None:
            raise record.fail("missing_key", f'a ShareGPT row needs "{key}" (a list of '
                              f'{{"from", "value"}} turns); got keys {_keys(data)}')
        turns = sharegpt_messages(record, data[key], key)
        system = data.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise record.fail("wrong_type",
                                  f'"system" must be a string; got {describe(system)}')
            if system:
                turns = [{"role": "system", "content": system}] + turns
        extras = {k: data[k] for k in CHAT_EXTRAS if data.get(k) is not None}
        if "tools" in extras:
            extras["tools"] = _tools(record, extras["tools"])
        if self.family == "prompt":
            return {"prompt": turns, **rest}
        if self.family == "sft":
            return {"messages": turns, **extras, **_passthrough(data)}
        if "chosen" in data or "rejected" in data or self.family == "paired":
            sides = {side: _sharegpt_response(record, data.get(side), side)
                     for side in ("chosen", "rejected")}
            return {"prompt": turns, **sides, **extras, **_passthrough(data)}
        if not turns:
            raise record.fail("empty_prompt", f'"{key}" is empty')
        return {"prompt": turns[:-1], "completion": turns[-1:], "label": data.get("label"),
                **extras, **_passthrough(data)}

    # --- Alpaca ----------------------------------------------------------------------------
    def _alpaca(self, record: Record, data: dict) -> dict:
        allowed = LAYOUT_KEYS[ALPACA] + RESPONSE_KEYS[self.family]
        rest = self._leftover(record, data, allowed, "an Alpaca row")
        prompt = alpaca_prompt(record, data)
        if self.family == "prompt":
            return {"prompt": prompt, **rest,
                    **({"output": data["output"]} if "output" in data else {})}
        if self.family != "sft" and ("chosen" in data or "rejected" in data
                                     or self.family == "paired"):
            return {"prompt": prompt, **{side: [_assistant(record, data.get(side), side)]
                                         for side in ("chosen", "rejected")},
                    **_passthrough(data)}
        reply = [_assistant(record, data.get("output"), "output")]
        if self.family == "sft":
            return {"messages": prompt + reply, **_passthrough(data)}
        return {"prompt": prompt, "completion": reply, "label": data.get("label"),
                **_passthrough(data)}

    def _leftover(self, record: Record, data: dict, allowed: tuple, what: str) -> dict:
        """Keys the layout does not read: an error in strict mode, reward columns for prompt
        data, ignored otherwise."""
        rest = {k: v for k, v in data.items() if k not in allowed + PASSTHROUGH}
        if self.family == "prompt":
            return {k: v for k, v in data.items() if k not in allowed}
        if rest and not self.select:
            key = next(iter(rest))
            raise record.fail("unknown_key", f"unknown key {key!r} would be ignored; {what} "
                              f"takes {', '.join(allowed)} (and passes "
                              f"{', '.join(PASSTHROUGH)} through unused)")
        return {}


def _auto_keys(family: str, data: dict) -> tuple[str, ...] | None:
    if family == "sft":
        order = ("messages", "prompt_completion", "text")
        present = {"messages": "messages" in data, "text": "text" in data,
                   "prompt_completion": "prompt" in data or "completion" in data}
    else:
        order = ("preference", "kto")
        present = {"preference": "chosen" in data or "rejected" in data,
                   "kto": "completion" in data or "label" in data}
    return next((NATIVE_KEYS[f] for f in order if present[f]), None)


def sharegpt_messages(record: Record, turns: Any, key: str) -> list[dict]:
    """ShareGPT turns as chat messages (roles mapped, see module doc)."""
    if not isinstance(turns, list):
        raise record.fail("wrong_type", f'"{key}" must be a list of {{"from", "value"}} turns; '
                          f"got {describe(turns)}")
    return [_sharegpt_turn(record, turn, f'"{key}"[{i}]') for i, turn in enumerate(turns)]


def _sharegpt_turn(record: Record, turn: Any, where: str) -> dict:
    if not isinstance(turn, dict) or not ({"from", "role"} & set(turn)):
        raise record.fail("bad_message", f'{where} must be an object with "from" and "value"; '
                          f"got {describe(turn)}")
    speaker = turn.get("from", turn.get("role"))
    role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise record.fail("unknown_role", f"{where} is from {describe(speaker)}; expected one "
                          f"of {', '.join(SHAREGPT_ROLES)}")
    content = turn.get("value", turn.get("content"))
    message = {k: v for k, v in turn.items() if k not in ("from", "role", "value", "content")}
    if speaker == "function_call":
        return {"role": "assistant", "content": None,
                "tool_calls": _tool_calls(record, content, where), **message}
    return {"role": role, "content": content, **message}


def _tool_calls(record: Record, value: Any, where: str) -> list[dict]:
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise record.fail("bad_message", f"{where} (function_call) must hold JSON "
                          f'{{"name", "arguments"}} (or a list of them); got {describe(value)}')
    return [{"type": "function", "function": {"name": c["name"],
                                              "arguments": c.get("arguments", {})}}
            for c in calls]


def _sharegpt_response(record: Record, value: Any, side: str) -> list[dict]:
    if value is None:
        raise record.fail("missing_key", f'a ShareGPT preference row needs "chosen" and '
                          f'"rejected"; "{side}" is missing')
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_sharegpt_turn(record, value, f'"{side}"')]
    return sharegpt_messages(record, value, side)


def alpaca_prompt(record: Record, data: dict) -> list[dict]:
    """System, history and the user turn of an Alpaca row (module doc)."""
    instruction, extra = data.get("instruction"), data.get("input")
    if instruction is None:
        raise record.fail("missing_key", 'an Alpaca row needs "instruction" (and "output"); '
                          f"got keys {_keys(data)}")
    for key, value in (("instruction", instruction), ("input", extra),
                       ("system", data.get("system"))):
        if value is not None and not isinstance(value, str):
            raise record.fail("wrong_type", f'"{key}" must be a string; got {describe(value)}')
    user = f"{instruction}\n{extra}" if extra else instruction
    if not user.strip():
        raise record.fail("empty_prompt", '"instruction" and "input" are both empty')
    messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
    history = data.get("history") or []
    if not isinstance(history, list):
        raise record.fail("wrong_type", '"history" must be a list of [query, reply] pairs; got '
                          f"{describe(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str)
                                                                 for t in pair)):
            raise record.fail("wrong_type", f'"history"[{i}] must be a [query, reply] pair of '
                              f"strings; got {describe(pair)}")
        messages += [{"role": "user", "content": pair[0]},
                     {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": user}]


def _assistant(record: Record, value: Any, key: str) -> dict:
    if value is None:
        raise record.fail("missing_key", f'an Alpaca row needs "{key}"; got keys '
                          f"{_keys(record.data)}")
    if not isinstance(value, str):
        raise record.fail("wrong_type", f'"{key}" must be a string; got {describe(value)}')
    return {"role": "assistant", "content": value}


def _tools(record: Record, tools: Any) -> Any:
    if isinstance(tools, str):
        try:
            return json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise record.fail("wrong_type", '"tools" must be a list of objects or a JSON string '
                              f"of one; got {describe(tools)}") from None
    return tools


def _rename(record: Record, columns: tuple[tuple[str, str], ...]) -> dict:
    data = record.data
    if not columns:
        return data
    out = {k: v for k, v in data.items()
           if k not in {s for _, s in columns} and k not in {t for t, _ in columns}}
    for target, source in columns:
        if source not in data:
            raise record.fail("missing_key", f'no "{source}" column (--columns '
                              f"{target}={source}); got keys {_keys(data)}")
        out[target] = data[source]
    return out


def _passthrough(data: dict) -> dict:
    return {k: data[k] for k in PASSTHROUGH if k in data}


def _keys(data: dict) -> str:
    return "[" + ", ".join(repr(k) for k in data) + "]"


def check_family_format(family: str, fmt: str, where: str = "--data-format") -> None:
    if fmt not in FAMILY_FORMATS[family]:
        raise DataError(f"{where} {fmt}: {FAMILY_NAMES[family]} data takes "
                        f"{', '.join(FAMILY_FORMATS[family])}")

