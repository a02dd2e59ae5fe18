"""Choosing each source's layout (:mod:`.layouts`): detected from its columns or first row.

With ``--data-format auto``: a ``conversations`` column (or ``messages`` whose turns have
``from``) is ShareGPT, an ``instruction`` column is Alpaca, anything else the family's own
formats. For tables the choice is checked once against the schema: a column the layout needs
but the data lacks is a file-level error naming the columns that exist; the columns it leaves
unread are listed in the report.
"""

from __future__ import annotations

from .layouts import (
    ALPACA,
    FAMILY_NAMES,
    LAYOUT_KEYS,
    NATIVE,
    NATIVE_KEYS,
    PASSTHROUGH,
    RESPONSE_KEYS,
    SHAREGPT,
    Layout,
    _auto_keys,
    _rename,
    check_family_format,
)
from .records import DataError, Record

REQUIRED = {  # columns a table must have, by (layout or native format)
    SHAREGPT: (), ALPACA: ("instruction",), "text": ("text",),
    "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
    "preference": ("chosen", "rejected"), "kto": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
AUTO_NEEDS = {"sft": '"text", "prompt" and "completion", or "messages"',
              "paired": '"chosen" and "rejected"',
              "unpaired": '"chosen" and "rejected", or "prompt", "completion" and "label"',
              "prompt": '"prompt"'}


def resolve_layout(family: str, fmt: str, columns: tuple[tuple[str, str], ...],
                   records: list[Record], schema: list[str] | None,
                   label: str) -> tuple[Layout, list[str]]:
    """The layout of one source (detected from its columns or first row when ``fmt`` is
    ``auto``) and, for tables, the columns it leaves unread. Raises a file-level DataError when
    a table lacks a column the layout needs, naming the columns it has."""
    check_family_format(family, fmt)
    first = next((r.data for r in records if r.error is None and isinstance(r.data, dict)), {})
    raw_keys = list(schema) if schema is not None else list(first)
    if schema is not None:
        for target, source in columns:
            if source not in schema:
                raise DataError(f"{label}: --columns {target}={source}: no column {source!r}; "
                                f"the columns are: {', '.join(schema)}", source=label)
    sources = {s for _, s in columns}
    keys = [k for k in raw_keys if k not in sources] + [t for t, _ in columns]
    name = {"sharegpt": SHAREGPT, "alpaca": ALPACA}.get(fmt, NATIVE)
    renamed = _rename(Record(label, 0, first), columns) if first else {}
    from_style = (isinstance(renamed.get("messages"), list) and renamed["messages"]
                  and isinstance(renamed["messages"][0], dict) and "from" in renamed["messages"][0])
    conversation_key = "messages" if "conversations" not in keys and "messages" in keys \
        else "conversations"
    if fmt == "auto":
        if "conversations" in keys or from_style:
            name = SHAREGPT
        elif "instruction" in keys:
            name = ALPACA
    layout = Layout(family, name, fmt, columns,
                    select=schema is not None or bool(columns) or fmt != "auto",
                    conversation_key=conversation_key)
    if schema is None:
        return layout, []
    _require(layout, keys, label)
    return layout, _ignored(layout, keys, raw_keys)


def _require(layout: Layout, keys: list[str], label: str) -> None:
    if layout.name == SHAREGPT:
        need = (layout.conversation_key,)
    elif layout.name == ALPACA:
        need = REQUIRED[ALPACA]
    elif layout.format == "messages" and layout.family == "prompt":
        need = ("messages",)
    elif layout.format != "auto":
        need = REQUIRED[layout.format]
    else:
        if _auto_keys(layout.family, dict.fromkeys(keys)) is not None or (
                layout.family == "prompt" and "prompt" in keys):
            return
        raise DataError(f"{label}: {FAMILY_NAMES[layout.family]} data needs columns "
                        f"{AUTO_NEEDS[layout.family]} (or --columns / --data-format); the "
                        f"columns are: {', '.join(keys)}", source=label)
    missing = [k for k in need if k not in keys]
    if missing:
        what = layout.name if layout.name != NATIVE else layout.format
        raise DataError(f"{label}: {what} data needs column {missing[0]!r}; the columns are: "
                        f"{', '.join(keys)} (map one with --columns {missing[0]}=NAME)",
                        source=label)


def _ignored(layout: Layout, keys: list[str], raw_keys: list[str]) -> list[str]:
    """Raw columns the layout never reads (a raw column shadowed by a --columns target is one)."""
    if layout.family == "prompt":
        return []
    if layout.name != NATIVE:
        read = set(LAYOUT_KEYS[layout.name]) | {layout.conversation_key}
        read |= set(RESPONSE_KEYS[layout.family])
    else:
        read = set(NATIVE_KEYS.get(layout.format)
                   or _auto_keys(layout.family, dict.fromkeys(keys)) or ())
        if layout.family == "unpaired" and layout.format == "preference":
            read |= set(NATIVE_KEYS["kto"])
    mapped = dict(layout.columns)
    used = {mapped.get(k, k) for k in read | set(PASSTHROUGH)}
    return [k for k in raw_keys if k not in used]
