"""GGUF file -> MLX model directory, keeping Q4_0 / Q4_1 / Q8_0 blocks quantised with no loss.

    gguf_to_mlx("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-mlx")   # mlx_lm.load("smollm2-mlx")

MLX's affine quantisation stores, per group of `group_size` values along a row, an unsigned
`bits`-bit integer q and a (scale, bias) pair: w = scale * q + bias. GGUF's 32-value blocks are
that with group_size 32 and d (and m) as float16:

| GGUF block (bytes)                  | GGUF value        | MLX bits | q stored       | scale | bias   |
|-------------------------------------|-------------------|----------|----------------|-------|--------|
| Q4_1: d f16, m f16, 16 B nibbles    | w = d * q + m     | 4        | q (0..15)      | d     | m      |
| Q4_0: d f16, 16 B nibbles           | w = d * (q - 8)   | 4        | q (0..15)      | d     | -8 d   |
| Q8_0: d f16, 32 x int8 q            | w = d * q         | 8        | q + 128        | d     | -128 d |

Bit layout: a GGUF 4-bit block keeps element j in the low nibble of byte j and element j + 16
in the high nibble; MLX keeps element i at bits 4 (i mod 8) of uint32 word i // 8 (little
endian), i.e. byte b holds elements 2b (low) and 2b + 1 (high). Q8_0's int8 q maps to MLX's
uint8 as q + 128 = byte XOR 0x80, four per uint32 word in order.

Exactness with `dtype="float32"` (the default): d is float16 (11 significant bits) and q at most
8 bits, so d * q is exact in float32, and so are -8 d, -128 d and d * (q - 8); MLX then rounds
d * q + bias once, exactly as gguf's numpy `d * q + m` does (Q4_1), and Q4_0 / Q8_0 involve no
rounding at all: mx.dequantize equals gguf.quants.dequantize value for value.
With `dtype="float16"` the stored d, m, -8 d are still exact (-128 d too unless |d| > 511.75,
which is refused), but MLX computes in float16, so the dequantised values are rounded to
float16: |error| <= 2^-11 |w| plus one float16 rounding of d * q (tests measure it).
bfloat16 cannot hold float16 d exactly, so it is refused here.

q/k rows are un-permuted like the float path (gguf_read.py): that moves whole rows, and the
groups run along a row, so the packed words, scales and biases move with their row unchanged.
Tensors in other formats (F32, F16, BF16, K-quants, ...) are written dequantised in `dtype`,
or re-quantised with mx.quantize only when `requantize_bits` asks for it (lossy).
"""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .gguf_read import GGUFTensor, dequantize, open_gguf_model, unpermute_rotary
from .gguf_to_hf import (
    DEFAULT_SHARD_BYTES,
    SAFETENSORS_DTYPE,
    PlannedTensor,
    check_dtype,
    save_weights,
    write_model_files,
)

Q = gguf.GGMLQuantizationType
MLX_DTYPES = ("float32", "float16")
GROUP_SIZE = 32  # GGUF's block size for Q4_0, Q4_1, Q8_0
EXACT_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


def gguf_blocks_to_affine(raw: np.ndarray, qtype: gguf.GGMLQuantizationType,
                          scale_dtype: type = np.float32
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 [rows, cols*bits/32], scales [rows, cols/32], biases) for a block tensor.

    `raw` is the GGUF tensor's bytes as the reader gives them: uint8 [rows, blocks * block bytes].
    """
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(rows, -1, type_size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == Q.Q8_0:
        packed = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q -> q + 128
        bias = -128 * d
    else:
        nibbles = blocks[..., 4:] if qtype == Q.Q4_1 else blocks[..., 2:]
        q = np.concatenate([nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)], axis=-1)
        packed = q[..., 0::2] | (q[..., 1::2] << np.uint8(4))
        bias = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
                if qtype == Q.Q4_1 else -8 * d)
    packed = np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)
    return packed, d.astype(scale_dtype), bias.astype(scale_dtype)


def _check_half_range(source: Path, item: GGUFTensor) -> None:
    """float16 biases must hold -128 d (Q8_0) / -8 d (Q4_0) without overflowing."""
    limit = {Q.Q8_0: 65504 / 128, Q.Q4_0: 65504 / 8}.get(item.qtype)
    if limit is None:
        return
    _, type_size = gguf.GGML_QUANT_SIZES[item.qtype]
    raw = np.ascontiguousarray(item.tensor.data).reshape(item.shape[0], -1, type_size)
    d_max = np.abs(raw[..., 0:2].copy().view(np.float16).astype(np.float32)).max()
    if d_max > limit:
        raise ValueError(f"{source}: tensor {item.tensor.name}: block scale {d_max} makes the "
                         "MLX bias overflow float16; use dtype float32")


def _affine_parts(source: Path, item: GGUFTensor, scale_dtype: type) -> tuple[np.ndarray, ...]:
    """(weight, scales, biases) of an exactly converted block tensor, q/k rows un-permuted."""
    arrays = gguf_blocks_to_affine(item.tensor.data, item.qtype, scale_dtype)
    if item.unpermute_heads:
        arrays = tuple(unpermute_rotary(a, item.unpermute_heads) for a in arrays)
    return arrays


def _requantized_parts(source: Path, item: GGUFTensor, bits: int, group_size: int,
                       scale_dtype: type) -> tuple[np.ndarray, ...]:
    import mlx.core as mx

    weight, scales, biases = mx.quantize(mx.array(dequantize(source, item)),
                                         group_size=group_size, bits=bits)
    return np.array(weight), np.array(scales).astype(scale_dtype), np.array(biases).astype(
        scale_dtype)


def _one_pass(compute: partial) -> list[partial]:
    """Three producers (weight, scales, biases) sharing one computation, dropped once written."""
    cache: dict[int, np.ndarray] = {}

    def part(index: int) -> np.ndarray:
        if not cache:
            cache.update(enumerate(compute()))
        return cache.pop(index)

    return [partial(part, index) for index in range(3)]


def _plan(source: Path, tensors: list[GGUFTensor], dtype: str, requantize_bits: int | None,
          group_size: int) -> tuple[list[PlannedTensor], dict[str, Any]]:
    """Planned safetensors entries, and {module: (group_size, bits) or None} for 2D weights."""
    scale_dtype = np.float32 if dtype == "float32" else np.float16
    scale_name = SAFETENSORS_DTYPE[dtype]
    planned: list[PlannedTensor] = []
    modules: dict[str, tuple[int, int] | None] = {}
    for item in tensors:
        rows = item.shape[0]
        is_matrix = len(item.shape) == 2 and item.hf_name.endswith(".weight")
        module = item.hf_name.removesuffix(".weight")
        if is_matrix and item.qtype in EXACT_BITS:
            if dtype == "float16":
                _check_half_range(source, item)
            bits, group = EXACT_BITS[item.qtype], GROUP_SIZE
            compute = partial(_affine_parts, source, item, scale_dtype)
        elif is_matrix and requantize_bits and item.shape[1] % group_size == 0:
            bits, group = requantize_bits, group_size
            compute = partial(_requantized_parts, source, item, bits, group, scale_dtype)
        else:
            if is_matrix:
                modules[module] = None
            planned.append(PlannedTensor(item.hf_name, scale_name, item.shape,
                                         partial(dequantize, source, item)))
            continue
        modules[module] = (group, bits)
        cols = item.shape[1]
        shapes = ((rows, cols * bits // 32), (rows, cols // group), (rows, cols // group))
        for suffix, shape, produce in zip(("weight", "scales", "biases"), shapes,
                                          _one_pass(compute)):
            planned.append(PlannedTensor(f"{module}.{suffix}",
                                         "U32" if suffix == "weight" else scale_name, shape, produce))
    return planned, modules


def quantization_config(modules: dict[str, tuple[int, int] | None]) -> dict[str, Any] | None:
    """mlx-lm's "quantization" entry: the commonest (group_size, bits) plus per-module overrides
    (a dict where a module differs, false where a matrix stays unquantised)."""
    counts = Counter(v for v in modules.values() if v is not None)
    if not counts:
        return None
    (group, bits), _ = counts.most_common(1)[0]
    config: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for module, setting in modules.items():
        if setting is None:
            config[module] = False
        elif setting != (group, bits):
            config[module] = {"group_size": setting[0], "bits": setting[1], "mode": "affine"}
    return config


def gguf_to_mlx(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                dtype: str = "float32", force: bool = False, requantize_bits: int | None = None,
                group_size: int = 64, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Convert a llama / qwen2 GGUF to an MLX model directory at `out_dir`; returns it.

    Q4_0 / Q4_1 / Q8_0 matrices stay quantised (see the module docstring for the exact affine
    mapping); other tensors are dequantised to `dtype` ("float32" exact, "float16"), or, with
    `requantize_bits` (2, 3, 4, 5, 6 or 8), re-quantised in groups of `group_size`. Checked fully
    before writing; written to a temporary sibling and renamed; `out_dir` replaced only if `force`.
    """
    source, out_dir = Path(gguf_path), Path(out_dir)
    if dtype == "bfloat16":
        raise ValueError("dtype = 'bfloat16' cannot hold GGUF's float16 block scales exactly; "
                         "use float32 (exact) or float16")
    check_dtype(dtype, MLX_DTYPES)
    if requantize_bits is not None and requantize_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"requantize_bits = {requantize_bits} is not one of 2, 3, 4, 5, 6, 8")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size = {group_size} is not one of 32, 64, 128")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    check_output_dir(out_dir, force, "gguf-to-mlx")
    model = open_gguf_model(source, dtype)
    planned, modules = _plan(source, model.tensors, dtype, requantize_bits, group_size)
    config = dict(model.config)
    quantization = quantization_config(modules)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx_lm's save_config writes both
    with atomic_output_dir(out_dir, force, "gguf-to-mlx") as tmp:
        save_weights(planned, tmp, max_shard_bytes)
        write_model_files(tmp, model, config)
    return out_dir
