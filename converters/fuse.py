"""Fuse a LoRA / DoRA adapter (mlx-lm or PEFT) into a model dir (HF or MLX), one shard at a time.

For every adapted linear layer (``A [r, in]``, ``B [out, r]``, scale ``s``; converters/adapters):

- LoRA: ``W' = W + s * B @ A``
- DoRA: ``W' = (m / ||W + s * B @ A||_row)[:, None] * (W + s * B @ A)`` (norm over the input axis)

computed in float32 from the (dequantised) base weight and rounded once to the base's dtype; the
bias is untouched. Both libraries' forwards equal ``x W'^T + b`` (see the adapters module).

MLX dirs may be quantised (mlx-lm ``quantization`` in config.json, affine mode): an adapted layer is
dequantised, merged and re-quantised with its own group size and bits (no flag), or the whole
model is written unquantised (``dequantize``), or re-quantised to ``quantize`` bits. Layers without
an adapter whose quantisation does not change are copied byte for byte.

The base's other files (tokenizer, generation config...) are copied; a ``chat_template.jinja``
beside the adapter (the template the run trained with) replaces the base's template.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .fingerprint import check_base_record
from .jsonfile import read_json_object

if TYPE_CHECKING:
    from .adapters import Adapter

INDEX = "model.safetensors.index.json"
SKIPPED_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".index.json")
QUANT_BITS, GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)
# The chat template a run trained with (--chat-template), saved beside its adapter weights.
CHAT_TEMPLATE = "chat_template.jinja"
# mlx-lm's Model.model.layers[i].<path> equals transformers' for these (read in mlx_lm/models);
# tested on llama and qwen2. Others are refused rather than guessed.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# --- safetensors, read lazily (memory-mapped) and written with the exact bytes ------------------
_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
       "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


class Stored(NamedTuple):
    dtype: str  # safetensors dtype name
    array: np.ndarray  # its storage (BF16 as uint16)


def read_header(path: Path) -> tuple[dict, dict, int]:
    """``(entries, metadata, data offset)`` of a safetensors file, without reading tensors."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a safetensors file ({error})") from error
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        if entry["dtype"] not in _NP:
            raise ValueError(f"{path}: {key}: unsupported dtype {entry['dtype']}")
    return header, metadata, 8 + size


def read_tensors(path: Path, names=None) -> tuple[dict[str, Stored], dict]:
    """Memory-mapped tensors of one file (all, or ``names``) and its metadata."""
    header, metadata, start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key in header if names is None else names:
        entry = header[key]
        lo, hi = entry["data_offsets"]
        array = raw[start + lo: start + hi].view(_NP[entry["dtype"]]).reshape(entry["shape"])
        out[key] = Stored(entry["dtype"], array)
    return out, metadata


def write_tensors(path: Path, tensors: dict[str, Stored], metadata: dict) -> int:
    """Write ``tensors`` (sorted by name) to ``path``; return the tensor bytes written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        stored = tensors[key]
        header[key] = {"dtype": stored.dtype, "shape": list(stored.array.shape),
                       "data_offsets": [offset, offset + stored.array.nbytes]}
        offset += stored.array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[key].array).tobytes())
    return offset




@dataclass
class BaseModel:
    """A model dir read only as far as its config and safetensors headers."""

    directory: Path
    config: dict
    shards: list[str]
    entries: dict[str, tuple[str, str, tuple]]  # key -> (shard, dtype, shape)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def quant_params(self, path: str) -> dict | None:
        """mlx-lm quantisation of module ``path`` (per-layer entry, else the model's), or None."""
        if f"{path}.scales" not in self.entries:
            return None
        q = self.config.get("quantization") or {}
        q = q[path] if isinstance(q.get(path), dict) else q
        if "bits" not in q or "group_size" not in q:
            raise ValueError(f"{self.directory / 'config.json'}: {path}.scales exists but the "
                             "config has no quantization bits/group_size for it")
        return {"group_size": int(q["group_size"]), "bits": int(q["bits"]),
                "mode": q.get("mode", "affine")}

    def linear_shape(self, path: str) -> tuple[int, int] | None:
        """``(out, in)`` of the (dequantised) weight of module ``path``; None if no 2-D weight."""
        entry = self.entries.get(f"{path}.weight")
        if entry is None or len(entry[2]) != 2:
            return None
        out, width = entry[2]
        q = self.quant_params(path)
        return (out, width * 32 // q["bits"]) if q else (out, width)

    def check_adapter(self, adapter: Adapter) -> None:
        """Every adapted module exists in this model with the adapter's in/out features."""
        model_type = self.config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{self.directory / 'config.json'}: model_type {model_type!r} is not "
                             f"supported (mlx-lm and transformers module paths are checked to "
                             f"agree for {', '.join(SUPPORTED_MODEL_TYPES)})")
        for path in sorted(adapter.modules):
            shape = self.linear_shape(path)
            if shape is None:
                block = {k[len("model.layers.0."): -len(".weight")] for k, e in self.entries.items()
                         if k.startswith("model.layers.0.") and k.endswith(".weight")
                         and len(e[2]) == 2}
                raise ValueError(f"{adapter.weights_file}: {adapter.modules[path]['A'][0]}: the "
                                 f"base model {self.directory} has no linear layer {path} (its "
                                 f"{self.num_layers} blocks have: {', '.join(sorted(block))})")
            shard, _, stored_shape = self.entries[f"{path}.weight"]
            quant = f" (quantised, {shape[1]} inputs)" if shape[1] != stored_shape[1] else ""
            for name, axis, want in (("A", 1, shape[1]), ("B", 0, shape[0])):
                key, stored = adapter.modules[path][name]
                if adapter.oriented(path, name, "peft").array.shape[axis] != want:
                    raise ValueError(
                        f"{adapter.weights_file}: {key} has shape {tuple(stored.array.shape)} "
                        f"but the base's {path}.weight in {self.directory / shard} has shape "
                        f"{tuple(stored_shape)}{quant}: an adapter for another base model?")


def read_base_model(directory: str | Path, fmt: str | None = None) -> BaseModel:
    """Config and tensor headers of an HF (``fmt="hf"``) or MLX (``"mlx"``) model dir."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected a model directory)")
    config = read_json_object(path)
    if fmt == "hf" and ("quantization" in config or "quantization_config" in config):
        raise ValueError(f"{path}: a quantised model; fuse HF models unquantised, or an MLX "
                         "quantised model with --format mlx")
    if fmt == "mlx" and "quantization_config" in config and "quantization" not in config:
        raise ValueError(f"{path}: quantization_config without mlx-lm 'quantization': "
                         "not an MLX quantised model")
    if "num_hidden_layers" not in config:
        raise ValueError(f"{path}: no num_hidden_layers (multimodal/nested configs not supported)")
    if (directory / INDEX).is_file():
        shards = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        shards = sorted(p.name for p in directory.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no model*.safetensors weights")
    entries = {}
    for shard in shards:
        header, _, _ = read_header(directory / shard)
        entries.update({k: (shard, e["dtype"], tuple(e["shape"])) for k, e in header.items()})
    return BaseModel(directory, config, shards, entries)


# --- float conversions (bf16 travels as uint16) ------------------------------------------------
def to_f32(stored: Stored) -> np.ndarray:
    if stored.dtype == "BF16":
        return (stored.array.astype(np.uint32) << 16).view(np.float32)
    if stored.dtype not in ("F32", "F16", "F64"):
        raise ValueError(f"cannot fuse into a {stored.dtype} weight")
    return stored.array.astype(np.float32)


def from_f32(w: np.ndarray, dtype: str) -> Stored:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "BF16":  # round to nearest even, NaN stays NaN
        u = w.view(np.uint32).astype(np.uint64)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return Stored("BF16", np.where(np.isnan(w), np.uint16(0x7FC0), bits))
    return Stored(dtype, w.astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype]))


def _to_mx(stored: Stored):
    import mlx.core as mx

    if stored.dtype == "BF16":
        return mx.array(np.asarray(stored.array)).view(mx.bfloat16)
    return mx.array(np.asarray(stored.array))


def _from_mx(x) -> Stored:
    import mlx.core as mx

    if x.dtype == mx.bfloat16:
        return Stored("BF16", np.array(x.view(mx.uint16)))
    return Stored({mx.float32: "F32", mx.float16: "F16", mx.uint32: "U32"}[x.dtype], np.array(x))


def dequantize(parts: dict[str, Stored], q: dict) -> np.ndarray:
    import mlx.core as mx

    biases = _to_mx(parts["biases"]) if "biases" in parts else None
    w = mx.dequantize(_to_mx(parts["weight"]), _to_mx(parts["scales"]), biases,
                      group_size=q["group_size"], bits=q["bits"], mode=q["mode"])
    return np.array(w.astype(mx.float32))


def quantize(w: np.ndarray, dtype: str, q: dict) -> dict[str, Stored]:
    """mlx ``quantize`` of ``w`` first rounded to the model's float ``dtype`` (as mlx-lm does)."""
    import mlx.core as mx

    parts = mx.quantize(_to_mx(from_f32(w, dtype)), group_size=q["group_size"], bits=q["bits"],
                        mode=q["mode"])
    return dict(zip(("weight", "scales", "biases"), map(_from_mx, parts)))


def merge(w: np.ndarray, adapter: Adapter, path: str) -> np.ndarray:
    """``W + s B A``, then for DoRA rescaled row-wise to the magnitude ``m``."""
    a, b = (to_f32(adapter.oriented(path, n, "peft")) for n in ("A", "B"))
    w = w + np.float32(adapter.scale) * (b @ a)
    if "m" in adapter.modules[path]:
        m = to_f32(adapter.modules[path]["m"][1])
        w = w * (m / np.linalg.norm(w, axis=1))[:, None]
    return w.astype(np.float32)


# --- the verb --------------------------------------------------------------------------------
def detect_format(base: str | Path) -> str:
    """"mlx" for an MLX model dir (mlx-lm quantisation in config.json, or weights whose
    safetensors metadata says mlx), else "hf" (converters.inspect recognises them)."""
    from .inspect import describe

    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{Path(base) / 'config.json'}: missing (expected a model "
                                "directory)")
    return "mlx" if describe(base).get("format") == "MLX model" else "hf"


def fuse(base: str | Path, adapter_dir: str | Path, out: str | Path, *, fmt: str | None = None,
         dequantize_all: bool = False, quantize_bits: int | None = None,
         group_size: int | None = None, force: bool = False,
         ignore_base_fingerprint: bool = False) -> Path:
    """Write ``base`` with ``adapter_dir`` merged to ``out``, in ``base``'s format ("hf"/"mlx").

    An adapter that records its base (``converters.fingerprint.BASE_RECORD``, written by both
    trainers) is refused on another architecture, and on other weights unless
    ``ignore_base_fingerprint``."""
    if fmt is None:
        fmt = detect_format(base)
    if fmt not in ("hf", "mlx"):
        raise ValueError(f"--format {fmt!r}: must be 'hf' or 'mlx'")
    if fmt == "hf" and (dequantize_all or quantize_bits is not None):
        raise ValueError("--dequantize / --quantize apply to MLX model dirs (--format mlx)")
    if dequantize_all and quantize_bits is not None:
        raise ValueError("--dequantize and --quantize exclude each other")
    if group_size is not None and quantize_bits is None:
        raise ValueError("--group-size needs --quantize BITS")
    if quantize_bits is not None and quantize_bits not in QUANT_BITS:
        raise ValueError(f"--quantize {quantize_bits}: bits must be one of {QUANT_BITS}")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: must be one of {GROUP_SIZES}")
    from .adapters import read_adapter
    from .value_head import read_value_head, write_value_head

    check_output_dir(Path(out), force, "fuse")
    model = read_base_model(base, fmt)
    adapter = read_adapter(adapter_dir)
    check_base_record(adapter_dir, base, model.config, ignore_base_fingerprint)
    model.check_adapter(adapter)
    head = read_value_head(adapter_dir, model.config.get("hidden_size"))
    new_q = None if quantize_bits is None else {
        "group_size": group_size or 64, "bits": quantize_bits, "mode": "affine"}

    def target(path: str, in_features: int) -> dict | None:
        if dequantize_all:
            return None
        if new_q is not None:
            return new_q if in_features % new_q["group_size"] == 0 else None
        return model.quant_params(path)

    modules = {k[: -len(".weight")] for k, e in model.entries.items()
               if k.endswith(".weight") and len(e[2]) == 2}
    for path in modules:  # refuse before writing anything
        q = model.quant_params(path)
        if q is not None and q["mode"] != "affine":
            raise ValueError(f"{model.directory}: {path}: quantisation mode {q['mode']!r}; fuse "
                             "handles affine only")
    quantised_parts = {f"{p}.{leaf}" for p in modules if model.quant_params(p)
                       for leaf in ("scales", "biases")}
    config = dict(model.config)
    if dequantize_all:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif new_q is not None:
        config["quantization"] = dict(new_q)
        config["quantization_config"] = dict(new_q)
    with atomic_output_dir(out, force, "fuse") as tmp:
        weight_map, total = {}, 0
        for shard in model.shards:
            tensors, metadata = read_tensors(model.directory / shard)
            written = {}
            for key, stored in tensors.items():
                path = key[: -len(".weight")]
                if key in quantised_parts:
                    continue  # written with its weight
                if path in modules and key.endswith(".weight"):
                    shape = model.linear_shape(path)
                    q_out = target(path, shape[1])
                    written.update(_fuse_module(model, tensors, adapter, path, q_out))
                else:
                    written[key] = stored
            if written:  # a shard holding only parts written with their weight elsewhere
                total += write_tensors(tmp / shard, written, metadata)
            weight_map.update(dict.fromkeys(written, shard))
            del tensors, written
        if (model.directory / INDEX).is_file():
            index = json.loads((model.directory / INDEX).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for path in sorted(model.directory.iterdir()):
            skip = path.name == "config.json" or path.name.endswith(SKIPPED_FILES)
            if path.is_file() and not skip:
                shutil.copy2(path, tmp / path.name)
        if (Path(adapter_dir) / CHAT_TEMPLATE).is_file():  # overrides the base's template
            shutil.copy2(Path(adapter_dir) / CHAT_TEMPLATE, tmp / CHAT_TEMPLATE)
        if config == model.config:
            shutil.copy2(model.directory / "config.json", tmp / "config.json")
        else:
            (tmp / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
        write_value_head(tmp, head)
    return Path(out)


def _fuse_module(model: BaseModel, shard: dict[str, Stored], adapter: Adapter, path: str,
                 q_out: dict | None) -> dict:
    """Output tensors of module ``path``: merged and/or (de/re)quantised, else verbatim.

    Its parts come from ``shard`` (the open one) or, when split across files, from their own.
    """
    q_in = model.quant_params(path)
    names = ("weight", "scales", "biases") if q_in else ("weight",)
    parts = {}
    for name in names:
        key = f"{path}.{name}"
        if key in shard:
            parts[name] = shard[key]
        elif key in model.entries:
            parts[name] = read_tensors(model.directory / model.entries[key][0], [key])[0][key]
    adapted = path in adapter.modules
    if not adapted and q_out == q_in:
        return {f"{path}.{name}": stored for name, stored in parts.items()}
    dtype = parts["scales"].dtype if q_in else parts["weight"].dtype
    w = dequantize(parts, q_in) if q_in else to_f32(parts["weight"])
    if adapted:
        w = merge(w, adapter, path)
    if q_out is None:
        return {f"{path}.weight": from_f32(w, dtype)}
    return {f"{path}.{name}": stored for name, stored in quantize(w, dtype, q_out).items()}
