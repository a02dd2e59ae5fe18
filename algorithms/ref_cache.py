"""``--precompute-ref``: reference log-probs computed once, cached on disk beside the dataset.

The reference policy never changes during a run, so its per-token log-probs for every training
sequence can be computed in one pass before training and reused (a second run with the same
model and data reuses the file). The cache is keyed by

    sha256(model fingerprint, dataset fingerprint, split)

where the model fingerprint covers ``config.json`` and every safetensors file's name, size,
modification time and header (shapes, dtypes, offsets), and the dataset fingerprint covers the
tokenised examples (so a different tokenizer, template, max length or mix is a different key).
It lives in ``<data dir>/.posttrain_cache/ref-<split>-<key[:16]>.npz`` when ``--data`` is one
local file or directory, else (several sources, a Hub id) under ``$POSTTRAIN_CACHE/ref/``;
written atomically.

Entries are per (example index, side): ``side`` 0 = chosen (or the KTO completion), 1 = rejected;
each holds the log-probs of that row's real (unpadded) positions. Rows are right-padded and never
packed, so position ``t`` of a row is the same whichever batch the example lands in.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np


def model_fingerprint(model_path: str | Path) -> str:
    path = Path(model_path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        stat = weights.stat()
        h.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with weights.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, 1 << 24)))
    return h.hexdigest()


def cache_root(data: Any) -> Path:
    """Where the cache of ``--data`` lives: beside one local source, else the posttrain cache
    (the key covers every token, so the place only matters for tidiness)."""
    from converters.models import cache_dir

    entries = [data] if isinstance(data, (str, Path)) else list(data or [])
    if len(entries) == 1 and isinstance(entries[0], (str, Path)):
        path = Path(entries[0]).expanduser()
        if path.exists():
            return path
    return cache_dir() / "ref"


def cache_file(data_path: str | Path, split: str, model_fp: str, data_fp: str) -> Path:
    data_path = Path(data_path)
    root = data_path if data_path.is_dir() else data_path.parent
    key = hashlib.sha256(f"{model_fp}:{data_fp}:{split}".encode()).hexdigest()
    return root / ".posttrain_cache" / f"ref-{split}-{key[:16]}.npz"


class ReferenceCache:
    """Per-(example, side) reference log-probs, and their placement into batch rows."""

    def __init__(self, entries: dict[tuple[int, int], np.ndarray]):
        self.entries = entries

    @staticmethod
    def row_keys(indices: list[int], paired: bool) -> list[tuple[int, int]]:
        """Which (example, side) each row of a collated batch holds (chosen rows first)."""
        if paired:
            return [(i, 0) for i in indices] + [(i, 1) for i in indices]
        return [(i, 0) for i in indices]

    def rows(self, keys: list[tuple[int, int]], width: int) -> np.ndarray:
        out = np.zeros((len(keys), width), dtype=np.float32)
        for r, key in enumerate(keys):
            values = self.entries[key]
            out[r, :len(values)] = values[:width]
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        keys = sorted(self.entries)
        flat = np.concatenate([self.entries[k] for k in keys]) if keys else np.zeros(0, np.float32)
        lengths = np.array([len(self.entries[k]) for k in keys], dtype=np.int64)
        with tmp.open("wb") as f:
            np.savez(f, keys=np.array(keys, dtype=np.int64).reshape(-1, 2), lengths=lengths,
                     values=flat.astype(np.float32), meta=np.array(json.dumps({"version": 1})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceCache:
        with np.load(path) as z:
            keys, lengths, values = z["keys"], z["lengths"], z["values"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return cls({(int(k[0]), int(k[1])): values[offsets[i]:offsets[i + 1]]
                    for i, k in enumerate(keys)})


def precompute(backend: Any, plan: Any, paired: bool) -> ReferenceCache:
    """Run the reference over every example once (epoch-0 batches cover each exactly once).
    Distributed, each rank scores its share of every batch and the entries are gathered."""
    from .distributed import current, empty_like, gather_concat, shard_batch

    world = current()
    entries: dict[tuple[int, int], np.ndarray] = {}
    options = {"kl": False} if getattr(plan, "kl", False) else {}
    for batch in plan.batches(0):
        share = shard_batch(batch, world)
        if not share.rows:  # every rank runs as many passes (FSDP2 gathers in each)
            backend.reference_per_token_logps(empty_like(None))
            continue
        arrays = plan.collate(share, **options)
        logps = backend.reference_per_token_logps(arrays)
        lengths = (arrays["segment_ids"] > 0).sum(axis=1)
        for r, key in enumerate(ReferenceCache.row_keys(list(share.indices), paired)):
            entries[key] = logps[r, :lengths[r]].astype(np.float32)
    return ReferenceCache(dict(gather_concat(entries.items(), world)))


def load_or_precompute(backend: Any, plan: Any, paired: bool, path: Path) -> ReferenceCache:
    """The cache at ``path``, or computed and saved there. Distributed, rank 0 decides, reads
    and writes; the entries reach every rank through the engine's collectives."""
    from .distributed import current

    world = current()
    if world.broadcast(path.is_file()):
        if world.main:
            print(f"reference log-probs: reusing {path}", file=sys.stderr)
        cache = ReferenceCache.load(path) if world.main else None
        return ReferenceCache(world.broadcast(cache.entries if cache else None))
    if world.main:
        print(f"reference log-probs: computing once for {len(plan.dataset)} examples -> {path}",
              file=sys.stderr)
    cache = precompute(backend, plan, paired)
    if world.main:
        cache.save(path)
    world.barrier()
    return cache
