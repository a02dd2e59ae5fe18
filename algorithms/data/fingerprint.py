"""Content fingerprints for the tokenisation cache: data files, tokenizers, the data-layer code.

- :func:`hash_files`: sha256 over each file's name and bytes. A file's digest is memoised in
  ``$POSTTRAIN_CACHE/data/file-hashes.json`` under (path, size, mtime, ctime, inode), so a second
  run rereads nothing it has hashed, and any change to a file (even one that restores its
  mtime: the ctime moves) is hashed afresh.
- :func:`tokenizer_fingerprint`: the tokenizer's class, its full serialisation (every vocab
  entry, merge, normaliser and special token), its chat template (after any override), its
  special tokens and the ``transformers`` / ``tokenizers`` versions.
- :func:`code_fingerprint`: the source of the modules that turn rows into tokens, so a change
  to a rule or to the tokenisation invalidates what was cached with the old code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MEMO_NAME = "file-hashes.json"
CODE_MODULES = ("records.py", "formats.py", "tokenize.py", "dataset.py", "preference.py",
                "preference_formats.py", "layouts.py", "readers.py", "cache.py", "parallel.py",
                "../rl/data.py")


def data_cache_dir() -> Path:
    """``$POSTTRAIN_DATA_CACHE``, else ``$POSTTRAIN_CACHE/data`` (``~/.cache/posttrain/data``)."""
    from converters.models import cache_dir

    if os.environ.get("POSTTRAIN_DATA_CACHE"):
        return Path(os.environ["POSTTRAIN_DATA_CACHE"]).expanduser()
    return cache_dir() / "data"


def hash_files(files: Iterable[Path]) -> str:
    """sha256 of the files' names and contents, in the given order (see module doc)."""
    memo_path = data_cache_dir() / MEMO_NAME
    memo = _read_memo(memo_path)
    changed = False
    h = hashlib.sha256()
    for file in files:
        file = Path(file)
        stat = file.stat()
        key = str(file.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        entry = memo.get(key)
        if entry is None or entry[0] != stamp:
            entry = [stamp, _digest(file)]
            memo[key] = entry
            changed = True
        h.update(f"{file.name}\0{entry[1]}\0".encode())
    if changed:
        _write_memo(memo_path, memo)
    return h.hexdigest()


def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        memo = json.loads(path.read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_memo(path: Path, memo: dict[str, Any]) -> None:
    """Atomic replace; a failure (read-only cache) only costs rehashing next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything about ``tokenizer`` that can change a token id (module doc)."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{transformers.__version__}|"
             f"{tokenizers.__version__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary, in id order
        h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
                            ensure_ascii=False).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, ensure_ascii=False).encode())
    special = {name: getattr(tokenizer, name, None) for name in (
        "bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
        "pad_token_id", "add_bos_token", "add_eos_token")}
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha256 of the data layer's source files (module doc)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in CODE_MODULES:
        path = (here / name).resolve()
        h.update(name.encode() + b"\0")
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()
