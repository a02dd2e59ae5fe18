"""Reading a source's splits into :class:`~.records.Record` rows, whatever it is stored as.

A source (:class:`~.sources.SourceSpec`) is, in the order tried:

- a file: ``.jsonl`` / ``.ndjson`` (read here, ``file:line`` errors, as always), ``.json`` (an
  array of objects, numbered ``file[row]``; JSON Lines in a ``.json`` file read as JSONL),
  ``.parquet``, ``.arrow``, ``.csv`` / ``.tsv`` (read by Hugging Face ``datasets``). A file is
  the ``train`` split only.
- a ``datasets`` ``save_to_disk`` directory (a ``Dataset``, or a ``DatasetDict`` of splits);
- a directory of such files, split by file name as the Hub does it (``train.jsonl``,
  ``valid.parquet``, ``data/train-00000-of-00002.parquet``...: ``datasets``' own patterns; a
  directory whose README.md declares ``configs``, or with ``--data-config``, is loaded by
  ``datasets`` as the Hub would);
- a Hugging Face dataset id ``org/name``: its snapshot in the local Hugging Face cache, read as a
  directory (no network), else ``datasets.load_dataset`` (which downloads; offline and absent is
  an error naming the id and the caches).

The training split is ``--data-split`` (default ``train``); the validation split is the one
``datasets`` calls ``validation`` (files named valid / validation / dev / val).

Rows of arrow-backed sources (everything but JSON / JSONL) have a schema: a value missing from
one row is stored as null, so null fields inside nested objects (messages, tools) are dropped,
and a top-level null means the column is absent from that row (:mod:`.layouts`).

Each split also gets an ``identity``, a hash of its content (the files' bytes, memoised by
path, size and times; or ``datasets``' fingerprint for a dataset downloaded by id), for the
tokenisation cache.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fingerprint import hash_files
from .records import DataError, Record, read_jsonl
from .sources import SourceSpec

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
DATA_SUFFIXES = JSON_SUFFIXES + tuple(TABLE_BUILDERS)
VALID = "validation"  # datasets' name for the valid / validation / dev / val files


@dataclass
class Rows:
    """A split's records and, for tables, the column names of its schema."""

    records: list[Record]
    columns: list[str] | None  # None: JSON rows, each with its own keys
    n_rows: int


@dataclass
class SplitSource:
    """One split of one source: its ``label`` (what messages call it), how to read it (deferred,
    so a cached split is never read) and its content ``identity``: the hash of ``files`` (taken
    when first asked for), or ``given`` (a Hub commit, a ``datasets`` fingerprint)."""

    label: str
    table: bool
    reader: Callable[[], Rows]
    files: list[Path] = field(default_factory=list)
    given: str | None = None

    @property
    def identity(self) -> str:
        if self.given is None:
            self.given = hash_files(self.files)
        return self.given

    def read(self) -> Rows:
        return self.reader()


def locate(spec: SourceSpec) -> dict[str, SplitSource]:
    """``{"train": ..., "valid": ..., "test": ...}`` (valid and test only when the source has
    them) for ``spec``."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        return {"train": _file_split(path, spec)}
    if path.is_dir():
        return _dir_splits(path, spec, str(path))
    from converters import hub

    if hub.looks_like_repo_id(spec.path):
        return _hub_splits(spec)
    raise DataError(f"{spec.path}: no such file or directory (expected a .jsonl, .json, .parquet, "
                    ".arrow or .csv file, a directory of them or with train.jsonl, a "
                    "save_to_disk directory, or a Hugging Face dataset id org/name)",
                    source=spec.path)


# --- files ----------------------------------------------------------------------------------

def _file_split(path: Path, spec: SourceSpec) -> SplitSource:
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected "
                        f"{', '.join(DATA_SUFFIXES)}, or a directory", source=str(path))
    if spec.config:
        raise DataError(f"{path}: --data-config {spec.config!r} applies to Hugging Face dataset "
                        "ids and directories with configs, not to a file", source=str(path))
    if suffix in JSON_SUFFIXES:
        return _json_split([path], str(path))
    return _table_split([path], str(path))


def _json_split(files: list[Path], label: str) -> SplitSource:
    def read() -> Rows:
        records = [r for f in files for r in read_json_records(f)]
        return Rows(records, None, len(records))

    return SplitSource(label, False, read, files)


def read_json_records(file: Path) -> list[Record]:
    """A ``.jsonl`` file's lines, or a ``.json`` file's array elements (``file[row]``)."""
    if file.suffix.lower() != ".json":
        return read_jsonl(file)
    raw = file.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not valid UTF-8 ({e.reason} at byte {e.start})",
                        source=str(file)) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line: JSON Lines named .json
            return read_jsonl(file)
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                        source=str(file)) from None
    if isinstance(value, dict) and len(raw.strip().splitlines()) == 1:
        return read_jsonl(file)  # a one-line JSON Lines file
    if not isinstance(value, list):
        raise DataError(f"{file}: a .json file holds an array of objects (or one object per "
                        f"line); got {type(value).__name__}", source=str(file))
    name = str(file)
    records = []
    for i, item in enumerate(value):
        record = Record(name, i, item, unit="row")
        if not isinstance(item, dict):
            record = Record(name, i, error=record.fail(
                "not_an_object", f"each element must be a JSON object; got {_kind(item)}"),
                unit="row")
        records.append(record)
    return records


def _table_split(files: list[Path], label: str) -> SplitSource:
    builders = {TABLE_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise DataError(f"{label}: one split mixes file types ({', '.join(sorted(builders))}); "
                        "convert them to one", source=label)
    builder = builders.pop()

    def read() -> Rows:
        kwargs = {"delimiter": "\t"} if files[0].suffix.lower() == ".tsv" else {}
        return table_rows(_load(label, lambda ds: ds.load_dataset(
            builder, data_files=[str(f) for f in files], split="train",
            cache_dir=datasets_cache_dir(), **kwargs)), label)

    return SplitSource(label, True, read, files)


# --- directories ----------------------------------------------------------------------------

def _dir_splits(path: Path, spec: SourceSpec, label: str,
                identity: str | None = None) -> dict[str, SplitSource]:
    """A directory's splits; ``identity`` (a Hub snapshot's commit) spares hashing its files."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _saved_splits(path, spec, label, identity)
    if spec.config or _declares_configs(path):
        return _builder_splits(path, spec, label, identity)
    files = _split_files(path, spec.split)
    if not files.get("train"):
        present = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                         if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        held = f"it holds {', '.join(present[:8])}" if present else "it holds no data file"
        wanted = "train.jsonl" if spec.split == "train" else f"{spec.split}.jsonl"
        raise DataError(f"{path}: a data directory must contain {wanted}; {held} (the "
                        f"{spec.split!r} split may also be .json/.parquet/.arrow/.csv files "
                        f"named {spec.split}*, or the directory a save_to_disk dir)",
                        source=str(path))
    out = {}
    for split, group in files.items():
        name = (str(Path(label) / group[0].relative_to(path)) if len(group) == 1
                else f"{label}:{split}")
        json_files = [f for f in group if f.suffix.lower() in JSON_SUFFIXES]
        if json_files and len(json_files) != len(group):
            raise DataError(f"{label}: the {split} split mixes JSON and table files; convert them "
                            "to one kind", source=label)
        out[split] = _json_split(group, name) if json_files else _table_split(group, name)
        if identity is not None:
            out[split].given = f"{identity}:{[str(f.relative_to(path)) for f in group]}"
    return out


def _split_files(path: Path, train_split: str) -> dict[str, list[Path]]:
    """``{"train": [...], "valid": [...]}`` by datasets' file-name patterns (or, for another
    training split name, files named ``<split>`` / ``<split>-*``); a directory with
    ``<split>.jsonl`` is today's layout (``valid.jsonl`` beside it), read without datasets."""
    if (path / f"{train_split}.jsonl").is_file():
        valid = [path / f"{name}.jsonl" for name in ("valid", "validation")
                 if (path / f"{name}.jsonl").is_file()][:1]
        test = [path / "test.jsonl"] if (path / "test.jsonl").is_file() else []
        return {"train": [path / f"{train_split}.jsonl"], **({"valid": valid} if valid else {}),
                **({"test": test} if test else {})}
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # noqa: BLE001 - EmptyDatasetError and friends: no data files at all
        resolved = {}
    found = {str(k): sorted(Path(f) for f in v if Path(f).suffix.lower() in DATA_SUFFIXES)
             for k, v in resolved.items()}
    out = {"train": found.get("train", []), "valid": found.get(VALID, []),
           "test": found.get("test", [])}
    if train_split != "train":
        pattern = re.compile(rf"^{re.escape(train_split)}([-._ 0-9].*)?$")
        out["train"] = sorted(p for p in path.rglob("*") if p.is_file()
                              and p.suffix.lower() in DATA_SUFFIXES and pattern.match(p.stem))
    return {k: v for k, v in out.items() if v}


def _declares_configs(path: Path) -> bool:
    readme = path / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    return re.search(r"^configs\s*:", header, re.MULTILINE) is not None


def _saved_splits(path: Path, spec: SourceSpec, label: str,
                  identity: str | None) -> dict[str, SplitSource]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    loaded = _load(label, lambda ds: ds.load_from_disk(str(path)))
    return _dataset_splits(loaded, spec, label, files, identity)


def _builder_splits(path: Path, spec: SourceSpec, label: str,
                    identity: str | None) -> dict[str, SplitSource]:
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    loaded = _load(label, lambda ds: ds.load_dataset(str(path), name=spec.config or None,
                                                     cache_dir=datasets_cache_dir()))
    return _dataset_splits(loaded, spec, label, files, identity)


def _hub_splits(spec: SourceSpec) -> dict[str, SplitSource]:
    from converters import hub

    snapshot = hub.cached_snapshot(spec.path, "dataset")
    if snapshot is not None:  # a snapshot's commit names its content
        return _dir_splits(snapshot, spec, spec.path, f"hub:{spec.path}@{snapshot.name}")
    where = (f"{spec.path}: not a local path, and the Hugging Face dataset {spec.path!r} is not "
             f"in the cache {hub.hub_cache_dir()}")
    if hub.hub_offline():
        raise DataError(f"{where} while the Hub is offline (HF_HUB_OFFLINE); fetch it once "
                        f"online (hf download {spec.path} --repo-type dataset) or give a local "
                        "path", source=spec.path)
    loaded = _load(spec.path, lambda ds: ds.load_dataset(spec.path, name=spec.config or None,
                                                         cache_dir=datasets_cache_dir()),
                   f"{where} and could not be loaded")
    return _dataset_splits(loaded, spec, spec.path, [], None)


def _dataset_splits(loaded: Any, spec: SourceSpec, label: str, files: list[Path],
                    identity: str | None) -> dict[str, SplitSource]:
    """The train / valid / test :class:`SplitSource` of a loaded ``Dataset`` or ``DatasetDict``; their
    identity: ``identity``, else the hash of ``files``, else ``datasets``' fingerprint."""
    if not hasattr(loaded, "keys"):  # one Dataset: the train split
        splits = {"train": (loaded, label)}
    else:
        names = list(loaded.keys())
        if spec.split not in names:
            raise DataError(f"{label}: no split {spec.split!r} (--data-split); it has "
                            f"{', '.join(names)}", source=label)
        splits = {"train": (loaded[spec.split], f"{label}:{spec.split}")}
        valid = next((n for n in (VALID, "valid", "dev", "val") if n in names), None)
        if valid is not None and valid != spec.split:
            splits["valid"] = (loaded[valid], f"{label}:{valid}")
        if "test" in names and spec.split != "test":
            splits["test"] = (loaded["test"], f"{label}:test")
    out = {}
    for split, (dataset, name) in splits.items():
        source = SplitSource(name, True, lambda dataset=dataset, name=name:
                             table_rows(dataset, name), files)
        if identity is not None or not files:
            source.given = f"{identity or 'datasets:' + dataset._fingerprint}:{name}"
        out[split] = source
    return out


# --- datasets -------------------------------------------------------------------------------

def datasets_cache_dir() -> str:
    """``datasets``' cache, from the environment as it is now (``HF_DATASETS_CACHE``, else
    ``HF_HOME``/datasets)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "datasets")


def _load(label: str, call: Callable[[Any], Any], what: str = "") -> Any:
    """``call(datasets)`` with progress bars off; its failures become a one-line DataError."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        return call(datasets)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - arrow / parse / missing-config errors, reported
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        what = what or f"{label}: could not be read by the datasets library"
        raise DataError(f"{what}: {type(e).__name__}: {reason}", source=label) from None


def table_rows(dataset: Any, label: str, batch_size: int = 4096) -> Rows:
    """Every row of a ``datasets.Dataset`` as a Record ``label[row]``; nulls inside nested
    objects dropped (see module doc)."""
    records: list[Record] = []
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for row in batch.to_pylist():
            records.append(Record(label, len(records), {k: _drop_nulls(v) for k, v in row.items()},
                                  unit="row"))
    return Rows(records, list(dataset.column_names), len(records))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _kind(value: Any) -> str:
    from .records import describe

    return describe(value)
