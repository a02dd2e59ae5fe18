"""Check a model dir before any backend loads it: one clear error per problem, no traceback.

:func:`check_model_dir` reads only ``config.json``, the tokenizer file names and the safetensors
headers (a few KB), so a broken model is reported in milliseconds, before the data is tokenised:

- ``config.json`` missing, not JSON, not an object, a key given twice, or without a
  ``model_type``;
- no safetensors weights, a shard listed in ``model.safetensors.index.json`` that is missing,
  a header that does not parse, or a file shorter than its header says (truncated);
- no tokenizer (``tokenizer.json``, ``tokenizer.model`` or ``vocab.json`` + ``merges.txt``).

What needs the backend (an architecture it cannot build, tensors of the wrong shape, missing
tensors, an MLX-quantised dir given to torch) is checked by ``mlx_ft.model`` /
``cuda_ft.model``, which raise :class:`ModelError` too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20


class ModelError(ValueError):
    """A model dir that cannot be trained as it is; the message names the file and the rule."""


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict; a ModelError for a missing, malformed or ambiguous file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelError(f"{file}: missing (a model dir holds config.json and its weights)")

    def unique(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ModelError(f"{file}: key {twice[0]!r} appears twice; keep one")
        return dict(pairs)

    try:
        config = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise ModelError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: must be a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ModelError(f"{file}: no \"model_type\" (e.g. \"llama\"), so the architecture is "
                         "unknown")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model dir (the index's shards, else every ``*.safetensors``)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a safetensors index (no \"weight_map\" object)") \
                from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ModelError(f"{path / missing[0]}: listed in {index.name} but missing")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(found[:3])}: convert them to safetensors)" if found else ""
        raise ModelError(f"{path}: no *.safetensors weights{hint}")
    return files


def check_safetensors(file: Path) -> dict[str, dict]:
    """The tensor table of one safetensors file; a ModelError if it is malformed or truncated."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{file}: truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelError(f"{file}: not a safetensors file, or truncated (header length {n}, "
                             f"file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ModelError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: corrupt safetensors header (not an object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, entry in tensors.items():
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            nbytes = count * DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{file}: corrupt safetensors header (entry {name!r})") from None
        if stop - start != nbytes:
            raise ModelError(f"{file}: corrupt safetensors header ({name!r} has shape "
                             f"{entry['shape']} but {stop - start} bytes)")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelError(f"{file}: truncated: its header describes {8 + n + end} bytes, the "
                         f"file has {size}")
    return tensors


def check_tokenizer(path: Path) -> None:
    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
            or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise ModelError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model, or vocab.json "
                         "+ merges.txt); copy the tokenizer files of the base model here")


def check_model_dir(path: Path) -> dict[str, Any]:
    """Every check of the module docstring; returns the config."""
    config = read_config(path)
    for file in weight_files(path):
        check_safetensors(file)
    check_tokenizer(path)
    return config


def is_mlx_quantized(config: dict[str, Any]) -> dict | None:
    """mlx-lm's ``quantization`` block (``{"group_size", "bits"}``), if the dir is MLX-quantised."""
    q = config.get("quantization")
    return q if isinstance(q, dict) and "bits" in q and "group_size" in q else None
