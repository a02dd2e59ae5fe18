"""GGUF file -> Hugging Face model directory (direction: GGUF -> HF; llama and qwen2).

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")   # -> Path("smollm2-hf")

writes `config.json` (LlamaForCausalLM / Qwen2ForCausalLM), `generation_config.json`, the
weights (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index past
`max_shard_bytes`) and the tokenizer files, loadable by `transformers.AutoModelForCausalLM` /
`AutoTokenizer` and `mlx_lm.load`. Every tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants,
whatever the installed `gguf` library implements) is dequantised with `gguf.quants.dequantize`,
its q/k rows un-permuted (see converters/gguf_read.py), and stored in `dtype`.

Streaming: the safetensors header is computed from the GGUF's tensor table first, then each
tensor is dequantised, written and dropped, so peak memory is about one float32 tensor (the
GGUF itself is memory-mapped). bfloat16 is rounded in numpy (round to nearest even), no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .gguf_read import (
    CHUNK_VALUES,
    SUPPORTED_ARCHITECTURES,
    GGUFModel,
    dequantize,
    hf_tensor_name,
    open_gguf,
    open_gguf_model,
    read_metadata,
    unpermute_rotary,
)

__all__ = ["DTYPES", "SUPPORTED_ARCHITECTURES", "PlannedTensor", "gguf_to_hf", "hf_tensor_name",
           "open_gguf", "read_metadata", "save_weights", "unpermute_rotary", "write_model_files"]

DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, safetensors dtype and shape are known before its values."""

    name: str
    dtype: str  # F32 | F16 | BF16 | U32
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even.

    bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16; NaN stays a (quiet) NaN.
    """
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


def _encode(item: PlannedTensor, values: np.ndarray) -> np.ndarray:
    """The bytes of `values` (some rows of the tensor) as `item.dtype`."""
    if item.dtype == "BF16":
        return float32_to_bfloat16_bits(values)
    if item.dtype == "U32":
        if values.dtype != np.uint32:
            raise ValueError(f"tensor {item.name}: produced {values.dtype}, planned uint32")
        return np.ascontiguousarray(values)
    out = np.ascontiguousarray(values, np.float16 if item.dtype == "F16" else np.float32)
    if item.dtype == "F16" and not np.isfinite(out).all() and np.isfinite(values).all():
        raise ValueError(f"tensor {item.name} overflows float16; use dtype bfloat16 or float32")
    return out


def write_safetensors(path: Path, items: list[PlannedTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written tensor by tensor (header first, from the plan)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.name] = {"dtype": item.dtype, "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for item in items:
            values = item.produce()
            if tuple(values.shape) != item.shape:
                raise ValueError(f"tensor {item.name}: produced shape {list(values.shape)}, "
                                 f"planned {list(item.shape)}")
            rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[None]
            step = max(1, CHUNK_VALUES // max(1, rows.shape[1]))
            out.writelines(memoryview(_encode(item, rows[start:start + step])).cast("B")
                           for start in range(0, rows.shape[0], step))  # a chunk at a time
            del values, rows


def save_weights(items: list[PlannedTensor], out_dir: Path,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_bytes` plus the HF index file."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0])
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard)
    index = {"metadata": {"total_size": sum(item.nbytes for item in items)},
             "weight_map": {item.name: name for name, shard in zip(names, shards) for item in shard}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_model_files(out_dir: Path, model: GGUFModel, config: dict) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config.get(k) is not None}
    files = dict(model.tokenizer_files)
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")


def check_dtype(dtype: str, allowed: tuple[str, ...] = DTYPES) -> None:
    if dtype not in allowed:
        raise ValueError(f"dtype = {dtype!r} is not supported (choose from {', '.join(allowed)})")


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
               dtype: str = "float32", force: bool = False,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Import a llama / qwen2 GGUF as a Hugging Face model directory at `out_dir`; returns it.

    Nothing is written until the whole file has been checked (architecture, metadata, every
    tensor's name, shape and type, the tokenizer); then the directory appears all at once
    (written to a temporary sibling and renamed), so a failure never leaves a partial model.
    An existing `out_dir` is an error unless `force`.
    """
    source, out_dir = Path(gguf_path), Path(out_dir)
    check_dtype(dtype)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    check_output_dir(out_dir, force, "gguf-to-hf")
    model = open_gguf_model(source, dtype)
    planned = [PlannedTensor(t.hf_name, SAFETENSORS_DTYPE[dtype], t.shape,
                             partial(dequantize, source, t)) for t in model.tensors]
    with atomic_output_dir(out_dir, force, "gguf-to-hf") as tmp:
        save_weights(planned, tmp, max_shard_bytes)
        write_model_files(tmp, model, model.config)
    return out_dir
