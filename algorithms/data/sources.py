"""``--data``: one or several sources, each with an optional mixing weight and its own options.

    --data train.jsonl                               # one source
    --data a.parquet:0.7 b.jsonl:0.3                 # a weighted mix (weights are relative)
    --data a.parquet b.jsonl                         # several sources, simply concatenated

or, in a YAML config, the list form, where each source may also set its own ``split``,
``config``, ``format`` and ``columns`` (defaults: ``--data-split``, ``--data-config``,
``--data-format``, ``--columns``)::

    data:
      - path: HuggingFaceH4/ultrachat_200k
        split: train_sft
        weight: 0.7
      - path: data/alpaca.parquet
        format: alpaca
        weight: 0.3
      - extra.jsonl:0.1                              # the string form works here too

A source is a path (file or directory) or a Hugging Face dataset id; :mod:`.readers` reads it.
Columns map as ``target=source`` (``prompt=question``): the data's ``question`` column is read as
``prompt``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import DataError

DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca",
                "preference", "kto", "prompt")
SOURCE_KEYS = ("path", "weight", "split", "config", "format", "columns")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data`` source and the options that shape how it is read."""

    path: str
    weight: float | None = None
    split: str = "train"
    config: str = ""
    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (target, source) pairs

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (run config, cache keys)."""
        return {"path": self.path, "weight": self.weight, "split": self.split,
                "config": self.config, "format": self.format,
                "columns": [list(c) for c in self.columns]}


def parse_columns(value: Any, where: str = "--columns") -> tuple[tuple[str, str], ...]:
    """``["prompt=question", "completion=answer"]`` (or one comma-joined string, or a mapping
    ``{prompt: question}``) -> ``(("prompt", "question"), ("completion", "answer"))``."""
    if not value:
        return ()
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        parts = [value] if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            if isinstance(part, dict):
                items += [(str(k), v) for k, v in part.items()]
                continue
            if not isinstance(part, str):
                raise DataError(f"{where}: expected target=source pairs; got {part!r}")
            for pair in filter(None, (p.strip() for p in part.split(","))):
                target, eq, source = pair.partition("=")
                if not eq:
                    raise DataError(f"{where}: {pair!r} is not target=source (e.g. "
                                    "prompt=question)")
                items.append((target.strip(), source.strip()))
    out: list[tuple[str, str]] = []
    for target, source in items:
        if not isinstance(source, str) or not target or not source:
            raise DataError(f"{where}: {target}={source!r}: both names must be non-empty strings")
        if target in {t for t, _ in out}:
            raise DataError(f"{where}: {target!r} is mapped twice")
        if source in {s for _, s in out}:
            raise DataError(f"{where}: column {source!r} is mapped twice")
        out.append((target, source))
    return tuple(out)


def parse_sources(data: Any, split: str = "train", config: str = "", fmt: str = "auto",
                  columns: Any = ()) -> list[SourceSpec]:
    """Every source of ``--data`` (strings ``PATH[:WEIGHT]`` or YAML mappings), with the global
    options as defaults; raises :class:`DataError` naming the entry and the rule."""
    entries = [data] if isinstance(data, (str, dict)) else list(data or [])
    if not entries:
        raise DataError("--data is required: a data file or directory, or a Hugging Face "
                        "dataset id")
    defaults = {"split": split, "config": config, "format": fmt,
                "columns": parse_columns(columns)}
    specs = [_parse_entry(entry, defaults) for entry in entries]
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        missing = specs[weighted.index(False)].path
        raise DataError(f"--data {missing}: give every source a weight (PATH:WEIGHT) or none")
    return specs


def _parse_entry(entry: Any, defaults: dict) -> SourceSpec:
    if isinstance(entry, str):
        path, weight = _split_weight(entry.strip())
        return _spec(path, weight, defaults, entry)
    if not isinstance(entry, dict):
        raise DataError(f"--data: each source is a string PATH[:WEIGHT] or a mapping with "
                        f"{', '.join(SOURCE_KEYS)}; got {entry!r}")
    for key in entry:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"--data: unknown key {key!r}{hint} in source {entry!r}; a source "
                            f"takes {', '.join(SOURCE_KEYS)}")
    if not isinstance(entry.get("path"), str) or not entry["path"].strip():
        raise DataError(f"--data: source {entry!r} needs a \"path\" (a file, directory or "
                        "Hugging Face dataset id)")
    where = f"--data {entry['path']}"
    options = dict(defaults)
    for key in ("split", "config", "format"):
        if key in entry:
            if not isinstance(entry[key], str):
                raise DataError(f"{where}: {key} must be a string; got {entry[key]!r}")
            options[key] = entry[key]
    if "columns" in entry:
        options["columns"] = parse_columns(entry["columns"], f"{where}: columns")
    weight = entry.get("weight")
    if weight is not None:
        weight = _check_weight(weight, where)
    return _spec(entry["path"].strip(), weight, options, where)


def _spec(path: str, weight: float | None, options: dict, where: str) -> SourceSpec:
    if options["format"] not in DATA_FORMATS:
        raise DataError(f"{where}: format {options['format']!r} must be one of "
                        f"{', '.join(DATA_FORMATS)}")
    if not options["split"]:
        raise DataError(f"{where}: the split name is empty")
    return SourceSpec(path, weight, options["split"], options["config"], options["format"],
                      options["columns"])


def _split_weight(text: str) -> tuple[str, float | None]:
    """``"a.parquet:0.7"`` -> ``("a.parquet", 0.7)``; a path that exists as written, or whose
    last ``:`` part is not a number, has no weight."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).expanduser().exists():
        return text, None
    try:
        value = float(tail)
    except ValueError:
        return text, None
    return head, _check_weight(value, f"--data {text}")


def _check_weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: the weight must be a number; got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{where}: the weight must be a finite number > 0; got {value!r}")
    return float(value)
