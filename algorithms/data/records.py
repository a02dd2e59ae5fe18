"""Reading JSONL datasets: one JSON object per line, each remembered with its ``file:line``.

(Other sources -- JSON arrays, parquet, arrow, CSV, ``save_to_disk`` dirs, Hub ids -- are read by
:mod:`.readers` into the same :class:`Record`, numbered by row: ``data.parquet[17]``.)

A dataset is either one ``.jsonl`` file (its only split is ``train``) or a directory holding
``train.jsonl`` and optionally ``valid.jsonl`` / ``test.jsonl``. Blank lines are not examples and
are skipped silently; every other line must be a JSON object, with no key twice in one object
(``duplicate_key``) and no lone surrogate in a string (``invalid_text``: ``"\ud800"`` parses as
JSON but is not Unicode text). A line that is not becomes a :class:`DataError` whose message
reads ``train.jsonl:17: <rule>; got <what was found>``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """An example (or a whole file) broke a data rule; the message names file:line and the rule.

    ``rule`` is a short identifier (``invalid_json``, ``unknown_role`` ...) used to count skipped
    examples under ``--skip-invalid``; ``source`` is ``"file:line"`` or the file alone for
    file-level problems (those are never skipped).
    """

    def __init__(self, message: str, rule: str = "file", source: str = ""):
        super().__init__(message)
        self.rule = rule
        self.source = source


@dataclass(frozen=True)
class Record:
    """One non-blank JSONL line: its ``file`` (as given by the user), 1-based ``line`` and value.

    ``data`` is whatever ``json.loads`` returned; a line that did not parse, or parsed to
    something other than an object, carries its :class:`DataError` in ``error`` instead (so
    ``--skip-invalid`` can count it and go on). A row of a table or JSON array has
    ``unit="row"``: ``line`` is then its 0-based row index and the source reads ``file[row]``.
    """

    file: str
    line: int
    data: Any = None
    error: DataError | None = None
    unit: str = "line"

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file}[{self.line}]"

    def fail(self, rule: str, message: str) -> DataError:
        """A DataError for this record: ``file:line: message``."""
        return DataError(f"{self.source}: {message}", rule=rule, source=self.source)


def kind_of(value: Any) -> str:
    """The JSON type of a value, with its article: ``a string``, ``an object``, ``null`` ..."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def describe(value: Any, limit: int = 60) -> str:
    """A short description of a JSON value for error messages: its type and a clipped repr."""
    kind = kind_of(value)
    text = json.dumps(value, ensure_ascii=False) if value is not None else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind} {text}".rstrip()


def split_path(path: str | Path, split: str) -> Path | None:
    """The JSONL file of ``split`` under ``path``, or None for a missing optional split.

    A file path is the ``train`` split (other splits: None). A directory must hold
    ``train.jsonl``; ``valid.jsonl`` / ``test.jsonl`` are optional. Anything else raises.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(path)
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if candidate.is_file():
            return candidate
        if split != "train":
            return None
        present = sorted(p.name for p in path.iterdir() if p.suffix == ".jsonl")
        found = f"; it holds {', '.join(present)}" if present else "; it holds no .jsonl file"
        raise DataError(f"{path}: a data directory must contain train.jsonl{found}",
                        source=str(path))
    if path.is_file():
        return path if split == "train" else None
    raise DataError(f"{path}: no such file or directory (expected a .jsonl file or a directory "
                    "with train.jsonl)", source=str(path))


def read_jsonl(file: str | Path) -> list[Record]:
    """Every non-blank line of ``file`` as a Record (bad lines carry their error)."""
    file = Path(file)
    name = str(file)
    records: list[Record] = []
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = Record(name, number)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                records.append(Record(name, number, error=record.fail(
                    "invalid_json", f"line is not valid UTF-8 ({e.reason} at byte {e.start})")))
                continue
            try:
                data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
            except _DuplicateKey as e:
                records.append(Record(name, number, error=record.fail(
                    "duplicate_key", f"key {e.key!r} appears twice in one object; JSON keeps "
                    "only the last, so one value would be ignored silently")))
                continue
            except json.JSONDecodeError as e:
                snippet = text.strip()
                snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
                records.append(Record(name, number, error=record.fail(
                    "invalid_json",
                    f"not valid JSON ({e.msg} at column {e.colno}); got {snippet}")))
                continue
            bad_text = _unencodable(data)
            if bad_text is not None:
                records.append(Record(name, number, error=record.fail(
                    "invalid_text", f"{bad_text} holds a lone surrogate (an escape such as "
                    "\\ud800 with no pair), which is not Unicode text and cannot be tokenised")))
                continue
            if not isinstance(data, dict):
                records.append(Record(name, number, error=record.fail(
                    "not_an_object",
                    "each line must be a JSON object such as {\"text\": ...}, {\"prompt\": ..., "
                    f"\"completion\": ...}} or {{\"messages\": [...]}}; got {describe(data)}")))
                continue
            records.append(Record(name, number, data))
    return records


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _unencodable(value: Any, where: str = "") -> str | None:
    """Where (``"messages"[0]["content"]``) ``value`` holds a string that UTF-8 cannot encode
    (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the line"
        return None
    if isinstance(value, dict):
        items = [(json.dumps(k, ensure_ascii=True), k, v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(str(i), None, v) for i, v in enumerate(value)]
    else:
        return None
    for label, key, item in items:
        inner = f"{where}[{label}]" if where else label
        bad = (_unencodable(key, f"a key of {where or 'the line'}") if key is not None else None)
        bad = bad or _unencodable(item, inner)
        if bad:
            return bad
    return None


def load_split(path: str | Path, split: str) -> list[Record] | None:
    """The records of ``split`` (``train`` / ``valid`` / ``test``); None if the split is absent."""
    file = split_path(path, split)
    return None if file is None else read_jsonl(file)


def validate_records(records: Iterable[Record], handle: Callable[[Record], None],
                     skip_invalid: bool) -> tuple[Counter[str], list[str]]:
    """Call ``handle(record)`` on every record. A :class:`DataError` it raises stops the load,
    or, with ``skip_invalid``, is counted by rule and kept as a message; file-level errors
    (rule ``file``) always stop it. Returns (skipped count by rule, skipped messages)."""
    skipped: Counter[str] = Counter()
    messages: list[str] = []
    for record in records:
        try:
            handle(record)
        except DataError as e:
            if not skip_invalid or e.rule == "file":
                raise
            skipped[e.rule] += 1
            messages.append(str(e))
    return skipped, messages


def nothing_usable(file: str, skipped: Counter[str], messages: list[str],
                   what: str = "examples") -> DataError:
    """The error for a split that kept no example: why, when everything was skipped."""
    why = f"; all {sum(skipped.values())} were invalid, the first: {messages[0]}" if skipped \
        else ""
    return DataError(f"{file}: no usable {what}{why}", source=file)
