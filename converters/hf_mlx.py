"""Hugging Face model dir <-> mlx-lm model dir, streamed shard by shard (directions in the names).

    hf_to_mlx("llama-hf", "llama-mlx")                          # same tensors, mlx-lm layout
    hf_to_mlx("llama-hf", "llama-4bit", bits=4, group_size=64)   # affine-quantised
    hf_to_mlx("llama-hf", "llama-q4-mixed", bits=4, mixed=True)  # embeddings / lm_head at 8 bits
    mlx_to_hf("llama-4bit", "llama-dequantised")                 # dequantised HF model dir

Both check the whole input from the config and the safetensors headers (family, every key, every
shape, the quantisation) before writing anything, then convert one tensor at a time into
size-limited shards (`converters.shards`) inside a temporary sibling dir that is renamed into
place at the end (`converters.atomic`). Key maps per family: `converters.keymaps`.

Affine quantisation (mlx `mx.quantize(w, group_size, bits)`): each run of `group_size`
consecutive input elements of a row shares a scale s and bias b, and
`w ~= s * q + b` with q an unsigned `bits`-bit integer (s = (max - min) / (2**bits - 1), b = min,
up to MLX's rounding of the edges); q values are packed into uint32 words, so a [out, in] weight
is stored as `weight` uint32 [out, in * bits / 32], `scales` and `biases` [out, in / group_size] in
the weight's dtype. Dequantising is exactly `mx.dequantize`, i.e. `s * q + b` in that dtype.
As in mlx-lm, the quantised layers are all Linear and Embedding layers whose input size is a
multiple of the group size; the rest stay unquantised. The mixed recipe (`mixed=True`) keeps
`model.embed_tokens` and `lm_head` at 8 bits (same group size) and quantises the rest at `bits`;
it is recorded per layer in config.json's "quantization" entry, which `mlx_lm.load` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import keymaps
from .atomic import atomic_output_dir, check_output_dir
from .jsonfile import read_json_object
from .shards import (
    DEFAULT_MAX_SHARD_BYTES,
    FLOAT_DTYPES,
    INDEX_NAME,
    ShardWriter,
    TensorInfo,
    iter_tensors,
    read_layout,
    weight_files,
)

DTYPES = ("float32", "float16", "bfloat16")
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports in affine mode
GROUP_SIZES = (32, 64, 128)
MIXED_BITS = 8
MIXED_MODULES = ("model.embed_tokens", "lm_head")
QUANT_PARTS = ("weight", "scales", "biases")  # what a quantised layer stores for its weight
# Non-weight files copied to the output: tokenizer, generation config, chat templates, code.
AUX_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".py", ".md")
SKIPPED_FILES = ("config.json", INDEX_NAME)


@dataclass(frozen=True)
class Quantisation:
    """Affine quantisation settings; `mixed` raises embed_tokens / lm_head to MIXED_BITS."""

    bits: int
    group_size: int
    mixed: bool = False

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits = {self.bits} is not supported (choose from "
                             f"{', '.join(map(str, QUANT_BITS))})")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size = {self.group_size} is not supported (choose from "
                             f"{', '.join(map(str, GROUP_SIZES))})")

    def params(self, module: str) -> dict[str, Any]:
        bits = MIXED_BITS if self.mixed and module in MIXED_MODULES else self.bits
        return {"group_size": self.group_size, "bits": bits, "mode": "affine"}

    def config_entry(self, modules: list[str]) -> dict[str, Any]:
        """config.json "quantization": the defaults plus one entry per layer that differs."""
        entry: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for module in modules:
            if self.params(module)["bits"] != self.bits:
                entry[module] = self.params(module)
        return entry


def quantise(weight: Any, bits: int, group_size: int) -> tuple[Any, Any, Any]:
    """(packed uint32 weight, scales, biases) with `mx.quantize` in affine mode."""
    import mlx.core as mx

    return tuple(mx.quantize(weight, group_size=group_size, bits=bits, mode="affine"))


def dequantise(weight: Any, scales: Any, biases: Any, bits: int, group_size: int) -> Any:
    """`scales * q + biases` per group: exactly `mx.dequantize` in affine mode."""
    import mlx.core as mx

    return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode="affine")


def read_config(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(path, contents) of `model_dir/config.json`, with errors naming the file."""
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a model directory needs config.json)")
    return path, read_json_object(path)


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r} is not supported (choose from {', '.join(DTYPES)})")


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    """Record the weight dtype where transformers reads it (v5 "dtype", v4 "torch_dtype")."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tensors_with_progress(src: Path) -> Iterator[tuple[Path, str, Any]]:
    """iter_tensors over `src`'s shards, saying which shard it is reading."""
    files = weight_files(src)
    current = None
    for file, key, array in iter_tensors(files):
        if file != current:
            current = file
            _log(f"reading {file.name} ({files.index(file) + 1}/{len(files)})")
        yield file, key, array


def _check_tensor(info: TensorInfo, key: str, shape: tuple[int, ...] | None, family: str) -> None:
    if shape is None:
        raise ValueError(f"{info.file}: tensor {key} is not a parameter of mlx-lm's {family} model")
    if info.shape != shape:
        raise ValueError(f"{info.file}: tensor {key} has shape {list(info.shape)}, but the config "
                         f"implies {list(shape)}")


def _check_complete(expected: dict[str, Any], found: set[str], model_dir: Path, name) -> None:
    missing = sorted(set(expected) - found)
    if missing:
        raise ValueError(f"{model_dir}: tensor {name(missing[0])} is missing "
                         f"({len(missing)} missing in all)")


def _copy_aux_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if (path.is_file() and path.suffix in AUX_SUFFIXES and path.name not in SKIPPED_FILES
                and not path.name.endswith(".safetensors.index.json")):
            shutil.copyfile(path, dst / path.name)


def _write_config(config: dict[str, Any], out: Path) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_to_mlx(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
              bits: int | None = None, group_size: int = 64, mixed: bool = False,
              force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert an HF model dir into an mlx-lm model dir at `out_dir`; returns `out_dir`.

    `dtype` casts floating tensors first (default: keep each tensor's dtype, so the tensors are
    bit-identical); `bits` quantises (affine, `group_size`), `mixed` keeps embeddings and lm_head
    at 8 bits. An existing `out_dir` is an error unless `force`.
    """
    import mlx.core as mx

    src, out = Path(hf_dir), Path(out_dir)
    _check_dtype(dtype)
    if bits is None and (mixed or group_size != 64):
        raise ValueError("mixed / group_size (--mixed / --group-size) need bits (--bits)")
    quant = Quantisation(bits, group_size, mixed) if bits is not None else None
    check_output_dir(out, force, "hf-to-mlx")
    config_path, config = read_config(src)
    for key in keymaps.QUANT_CONFIG_KEYS:
        if key in config:
            raise ValueError(f"{config_path}: has {key!r}, so it is already quantised; "
                             "hf-to-mlx takes unquantised HF models (use mlx-to-hf for MLX ones)")
    family = keymaps.family_for(config, config_path)
    mlx_config = keymaps.hf_to_mlx_config(family, config, config_path)
    tied = mlx_config["tie_word_embeddings"]
    model = keymaps.mlx_model_skeleton(family, mlx_config, config_path)
    expected = keymaps.expected_shapes(model)
    layout = read_layout(src)

    plan: dict[str, str] = {}  # HF key -> mlx key, for the tensors that are kept
    for key, info in layout.items():
        mlx_key = keymaps.hf_to_mlx_key(family, key, tied)
        if mlx_key is not None:
            _check_tensor(info, key, expected.get(mlx_key), family.model_type)
            plan[key] = mlx_key
    _check_complete(expected, set(plan.values()), src,
                    lambda k: keymaps.mlx_to_hf_key(family, k))

    quantised: dict[str, dict[str, Any]] = {}  # mlx module path -> params
    if quant is not None:
        for path in keymaps.quantisable_modules(model):
            if expected[f"{path}.weight"][-1] % group_size == 0:
                quantised[path] = quant.params(path)
        mlx_config["quantization"] = quant.config_entry(sorted(quantised))
        mlx_config["quantization_config"] = mlx_config["quantization"]
    cast = getattr(mx, dtype) if dtype else None
    if dtype:
        _set_dtype(mlx_config, dtype)

    with atomic_output_dir(out, force, "hf-to-mlx") as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, {"format": "mlx"})
        for _, key, array in _tensors_with_progress(src):
            if key not in plan:
                continue
            mlx_key = plan[key]
            if cast is not None and mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(cast)
            module = mlx_key.removesuffix(".weight")
            if module in quantised:
                params = quantised[module]
                parts = quantise(array, params["bits"], params["group_size"])
                for suffix, part in zip(QUANT_PARTS, parts):
                    writer.add(f"{module}.{suffix}", part)
            else:
                writer.add(mlx_key, array)
            del array
        index = writer.close()
        _write_config(mlx_config, tmp)
        _copy_aux_files(src, tmp)
    _log(f"{src} -> {out}: {len(index['weight_map'])} tensors in {len(writer.shard_sizes)} "
         f"shard(s), largest {max(writer.shard_sizes) / 2**20:.1f} MiB")
    return out


def _quant_params(entry: Any, module: str, config_path: Path) -> dict[str, Any]:
    """bits / group_size / mode for one quantised module from config.json's "quantization"."""
    params = entry.get(module, entry)
    if not isinstance(params, dict) or "bits" not in params or "group_size" not in params:
        raise ValueError(f"{config_path}: quantization entry for {module} has no bits/group_size")
    mode = params.get("mode", "affine")
    if mode != "affine":
        raise ValueError(f"{config_path}: {module} is quantised with mode {mode!r}; only affine "
                         "quantisation is supported")
    return {"bits": int(params["bits"]), "group_size": int(params["group_size"])}


def _check_quantised(layout: dict[str, TensorInfo], module: str, params: dict[str, Any],
                     shape: tuple[int, ...] | None, family: str) -> None:
    """The packed weight, scales and biases of `module` agree with each other and the model."""
    scales = layout[f"{module}.scales"]
    if f"{module}.biases" not in layout:
        raise ValueError(f"{scales.file}: {module}.scales has no {module}.biases, so it is not "
                         "affine quantisation (unsupported quant type)")
    weight = layout.get(f"{module}.weight")
    if weight is None:
        raise ValueError(f"{scales.file}: {module}.scales has no {module}.weight")
    if weight.dtype != "uint32" or scales.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{weight.file}: {module}.weight is {weight.dtype} with {scales.dtype} "
                         "scales; affine quantisation stores uint32 weights and float scales "
                         "(unsupported quant type)")
    if shape is None:
        raise ValueError(f"{weight.file}: tensor {module}.weight is not a parameter of mlx-lm's "
                         f"{family} model")
    bits, group = params["bits"], params["group_size"]
    packed = (*shape[:-1], shape[-1] * bits // 32)
    grouped = (*shape[:-1], shape[-1] // group)
    biases = layout[f"{module}.biases"]
    for info, name, want in ((weight, "weight", packed), (scales, "scales", grouped),
                             (biases, "biases", grouped)):
        if info.shape != want:
            raise ValueError(f"{info.file}: tensor {module}.{name} has shape {list(info.shape)}, "
                             f"but a {list(shape)} weight at {bits} bits, group size {group} "
                             f"needs {list(want)}")


def mlx_to_hf(mlx_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
              force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert an mlx-lm model dir (quantised or not) into an HF model dir; returns `out_dir`.

    Quantised layers are dequantised with `mx.dequantize` (into their scales' dtype), mlx-lm's
    sanitize is undone per `converters.keymaps`, and `dtype` casts floating tensors last.
    """
    import mlx.core as mx

    src, out = Path(mlx_dir), Path(out_dir)
    _check_dtype(dtype)
    check_output_dir(out, force, "mlx-to-hf")
    config_path, config = read_config(src)
    family = keymaps.family_for(config, config_path)
    entry = config.get("quantization")
    if entry is None and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{config_path}: quantization_config.quant_method = {method!r} is not "
                         "supported (only mlx-lm's affine quantisation)")
    hf_config = keymaps.mlx_to_hf_config(family, config)
    keymaps.is_tied(family, hf_config, config_path)
    expected = keymaps.expected_shapes(keymaps.mlx_model_skeleton(family, hf_config, config_path))
    layout = read_layout(src)

    quantised: dict[str, dict[str, Any]] = {}
    for key in layout:
        if key.endswith(".scales"):
            module = key.removesuffix(".scales")
            if not isinstance(entry, dict):
                raise ValueError(f"{layout[key].file}: tensor {key} is quantised, but {config_path}"
                                 " has no quantization entry")
            quantised[module] = _quant_params(entry, module, config_path)
            _check_quantised(layout, module, quantised[module], expected.get(f"{module}.weight"),
                             family.model_type)
    found = set()
    for key, info in layout.items():
        module, _, suffix = key.rpartition(".")
        if module in quantised and suffix in QUANT_PARTS:
            found.add(f"{module}.weight")
        else:
            _check_tensor(info, key, expected.get(key), family.model_type)
            found.add(key)
    _check_complete(expected, found, src, lambda k: k)
    if dtype:
        _set_dtype(hf_config, dtype)
    elif quantised:
        first = layout[f"{next(iter(quantised))}.scales"]
        _set_dtype(hf_config, first.dtype)
    cast = getattr(mx, dtype) if dtype else None

    with atomic_output_dir(out, force, "mlx-to-hf") as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, {"format": "pt"})
        pending: dict[str, dict[str, Any]] = {}  # a quantised module's parts until all three came
        for _, key, array in _tensors_with_progress(src):
            module, _, suffix = key.rpartition(".")
            if module in quantised and suffix in QUANT_PARTS:
                parts = pending.setdefault(module, {})
                parts[suffix] = array
                if len(parts) < len(QUANT_PARTS):
                    continue
                del pending[module]
                params = quantised[module]
                array = dequantise(parts["weight"], parts["scales"], parts["biases"],
                                   params["bits"], params["group_size"])
                key = f"{module}.weight"
            if cast is not None and mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(cast)
            writer.add(keymaps.mlx_to_hf_key(family, key), array)
            del array
        index = writer.close()
        _write_config(hf_config, tmp)
        _copy_aux_files(src, tmp)
    _log(f"{src} -> {out}: {len(index['weight_map'])} tensors in {len(writer.shard_sizes)} "
         f"shard(s), largest {max(writer.shard_sizes) / 2**20:.1f} MiB")
    return out
