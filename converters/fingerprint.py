"""Content fingerprints of model dirs and files: what a checkpoint or an adapter was made from.

``file_digest`` hashes a file's size and content: all of it up to 8 MiB, else 16 evenly spaced
64 KiB chunks plus the last one (about 1 MiB read whatever the size), so fingerprinting a 15 GB
model takes milliseconds. Regenerated or retrained weights, a truncated or re-quantised file,
an edited config or tokenizer all change it; copying or moving the files (new paths, new
modification times) does not. A single flipped byte in the middle of a multi-GB shard may go
unnoticed: this is a "same model?" check, not an integrity check.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_BELOW = 8 << 20
CHUNK = 64 << 10
SAMPLES = 16


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of the file's size and content (sampled above 8 MiB)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with path.open("rb") as f:
        if size <= FULL_BELOW:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            offsets = [i * (size - CHUNK) // SAMPLES for i in range(SAMPLES)] + [size - CHUNK]
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(CHUNK))
    return h.hexdigest()


MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".jinja", ".txt",
                  ".tiktoken"}


def model_fingerprint(model_dir: str | os.PathLike) -> dict[str, str]:
    """``{file name: digest}`` of the files at the top of a model dir that make the model:
    config, weights, tokenizer, chat template (not READMEs or hidden files)."""
    model_dir = Path(model_dir)
    return {p.name: file_digest(p) for p in sorted(model_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_SUFFIXES}


def combined(fingerprint: dict[str, str]) -> str:
    """One hex id for a ``{name: digest}`` fingerprint."""
    h = hashlib.sha256()
    for name, digest in sorted(fingerprint.items()):
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()


def differences(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """What changed between two ``{name: digest}`` fingerprints, one phrase per file."""
    out = []
    for name in sorted(set(before) | set(now)):
        if name not in now:
            out.append(f"{name} is gone")
        elif name not in before:
            out.append(f"{name} is new")
        elif before[name] != now[name]:
            out.append(f"{name} changed")
    return out


# --- what an adapter was trained on ------------------------------------------------------------
BASE_RECORD = "posttrain_base.json"
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")


def _architecture(config: dict) -> dict:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {k: config.get(k, text.get(k)) for k in ARCHITECTURE_KEYS}


def write_base_record(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike) -> None:
    """Record next to an adapter which base it was trained on: the architecture (the config's
    shape-defining keys) and the base's content fingerprint."""
    import json

    config = json.loads((Path(base_dir) / "config.json").read_text())
    record = {"base_model": str(base_dir), "architecture": _architecture(config),
              "base_fingerprint": combined(model_fingerprint(base_dir))}
    (Path(adapter_dir) / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def check_base_record(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike,
                      base_config: dict, ignore_fingerprint: bool = False) -> None:
    """A ValueError when the adapter's recorded base is not ``base_dir``: another architecture
    always, other weights unless ``ignore_fingerprint`` (the same model in another format,
    e.g. converted with hf-to-mlx). Adapters without a record (other tools) pass."""
    import json

    file = Path(adapter_dir) / BASE_RECORD
    if not file.is_file():
        return
    try:
        record = json.loads(file.read_text())
        recorded, fingerprint = record["architecture"], record["base_fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{file}: unreadable (not the JSON this tool writes)") from None
    now = _architecture(base_config)
    differ = [f"{k} {recorded.get(k)!r} vs {now[k]!r}" for k in ARCHITECTURE_KEYS
              if recorded.get(k) != now[k]]
    if differ:
        raise ValueError(f"{adapter_dir}: trained on another architecture than {base_dir} "
                         f"({'; '.join(differ[:3])}); fuse it into the base it was trained on "
                         f"({record.get('base_model')})")
    if not ignore_fingerprint and fingerprint != combined(model_fingerprint(base_dir)):
        raise ValueError(f"{adapter_dir}: trained on {record.get('base_model')}, whose weights "
                         f"differ from {base_dir}'s; fuse it into that base, or pass "
                         "--ignore-base-fingerprint if this is the same model in another format")
