"""The tokenisation cache: one source split, validated and tokenised, stored on disk.

Keyed by sha256 over (the split's content identity (:mod:`.readers`), its label, the source's
options (split, config, format, columns), the data family and the settings that shape its tokens
(max length, train-on, prompt limits...), ``--skip-invalid``, the tokenizer's fingerprint
(chat template included) and the data-layer code's fingerprint (:mod:`.fingerprint`)). A change
to any of them is a different key, so a stale entry is never read; the second run of the same
recipe reads the examples back instead of reading and tokenising the data.

Entries live in ``$POSTTRAIN_CACHE/data/tok-<key>.npz`` (``--no-data-cache`` turns the cache
off; deleting the directory is always safe): token ids (int32) and loss masks (uint8) of every
sequence, flat, with offsets, and a JSON header with everything else. Written atomically; an
unreadable entry is ignored (and rewritten). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import data_cache_dir

FORMAT_VERSION = 1


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def cache_path(key: str) -> Path:
    return data_cache_dir() / f"tok-{key[:32]}.npz"


def load(key: str) -> dict[str, Any] | None:
    """The cached split (a dict with ``examples`` and its report fields), or None."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            tokens, masks, offsets = z["tokens"], z["masks"], z["offsets"]
        if header.pop("key", None) != key:
            return None
        seqs = _Sequences(tokens, masks, offsets)
        header["examples"] = [_decode(m, seqs) for m in header.pop("meta")]
        return header
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"data cache: ignoring unreadable {path} ({type(e).__name__})", file=sys.stderr)
        return None


def save(key: str, split: dict[str, Any]) -> None:
    """Store ``split`` (``examples`` plus JSON-able report fields) under ``key``; a split whose
    columns are not JSON (dates, bytes) or a cache that cannot be written is left uncached."""
    tokens: list[list[int]] = []
    masks: list[list[int]] = []
    meta = [_encode(e, tokens, masks) for e in split["examples"]]
    header = {k: v for k, v in split.items() if k != "examples"}
    try:
        text = json.dumps({**header, "key": key, "meta": meta}, ensure_ascii=False)
    except (TypeError, ValueError):
        return
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens]
                          or [np.zeros(0, np.int32)]).astype(np.int32)
    flat_mask = np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks]
                               or [np.zeros(0, np.uint8)]).astype(np.uint8)
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.savez(f, tokens=flat, masks=flat_mask, offsets=offsets,
                     header=np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8))
        os.replace(tmp, path)
    except OSError as e:
        print(f"data cache: not written ({e})", file=sys.stderr)


class _Sequences:
    def __init__(self, tokens: np.ndarray, masks: np.ndarray, offsets: np.ndarray):
        self.tokens, self.masks, self.offsets = tokens, masks, offsets

    def ids(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist()

    def mask(self, i: int) -> list[int]:
        return self.masks[self.offsets[i]:self.offsets[i + 1]].tolist()


def _add(tokens: list, masks: list, ids: list[int], mask: list[int] | None) -> int:
    tokens.append(ids)
    masks.append(mask if mask is not None else [0] * len(ids))
    return len(tokens) - 1


def _encode_side(seq: Any, tokens: list, masks: list) -> list:
    return [_add(tokens, masks, seq.input_ids, seq.loss_mask), seq.prompt_length,
            seq.truncated, seq.prompt_truncated]


def _decode_side(values: list, seqs: _Sequences) -> Any:
    from .preference import PromptResponse

    i, prompt_length, truncated, prompt_truncated = values
    return PromptResponse(seqs.ids(i), seqs.mask(i), prompt_length, truncated, prompt_truncated)


def _encode(example: Any, tokens: list, masks: list) -> dict:
    from .preference import PreferenceExample, UnpairedExample
    from .tokenize import Example

    if isinstance(example, Example):
        return {"t": "sft", "s": example.source, "x": example.truncated,
                "q": _add(tokens, masks, example.input_ids, example.loss_mask)}
    if isinstance(example, PreferenceExample):
        return {"t": "pair", "s": example.source, "c": _encode_side(example.chosen, tokens, masks),
                "r": _encode_side(example.rejected, tokens, masks)}
    if isinstance(example, UnpairedExample):
        return {"t": "kto", "s": example.source, "l": example.label,
                "q": _encode_side(example.sequence, tokens, masks)}
    # algorithms.rl.data.PromptExample and algorithms.distill.data.DistillExample (imported
    # lazily: both import the data layer)
    if hasattr(example, "completion_ids"):
        completion = example.completion_ids
        return {"t": "distill", "s": example.source, "p": example.prompt, "c": example.columns,
                "q": _add(tokens, masks, example.prompt_ids, None),
                "d": None if completion is None else _add(tokens, masks, completion, None),
                "x": example.completion_truncated}
    return {"t": "prompt", "s": example.source, "p": example.prompt, "c": example.columns,
            "q": _add(tokens, masks, example.prompt_ids, None)}


def _decode(meta: dict, seqs: _Sequences) -> Any:
    from .preference import PreferenceExample, UnpairedExample
    from .tokenize import Example

    kind = meta["t"]
    if kind == "sft":
        return Example(seqs.ids(meta["q"]), seqs.mask(meta["q"]), meta["s"], meta["x"])
    if kind == "pair":
        return PreferenceExample(_decode_side(meta["c"], seqs), _decode_side(meta["r"], seqs),
                                 meta["s"])
    if kind == "kto":
        return UnpairedExample(_decode_side(meta["q"], seqs), meta["l"], meta["s"])
    if kind == "prompt":
        from ..rl.data import PromptExample

        return PromptExample(meta["s"], meta["p"], seqs.ids(meta["q"]), meta["c"])
    if kind == "distill":
        from ..distill.data import DistillExample

        completion = None if meta["d"] is None else seqs.ids(meta["d"])
        return DistillExample(meta["s"], meta["p"], seqs.ids(meta["q"]), meta["c"], completion,
                              meta["x"])
    raise ValueError(kind)
