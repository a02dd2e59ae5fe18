"""`describe(path)`: what a model dir, adapter dir or weights file is, from headers and configs.

    python -m converters info runs/sft/merged          # human-readable
    python -m converters info model.gguf --json         # the dict describe() returns

Nothing is loaded but JSON configs and safetensors / GGUF headers, so it is instant on any size.
How the format is recognised (first rule that matches):

| format            | rule                                                                  |
|-------------------|-----------------------------------------------------------------------|
| GGUF file         | a file starting with the magic bytes `GGUF` (read with `gguf`'s reader) |
| safetensors file  | any other file ending in `.safetensors`                               |
| PEFT adapter      | dir with adapter_config.json and adapter_model.safetensors            |
| MLX adapter       | dir with adapter_config.json and adapters.safetensors                 |
| MLX model         | dir with config.json whose config has "quantization", or whose shards'  |
|                   | metadata says format "mlx" (what mlx-lm and hf-to-mlx write)            |
| HF model          | any other dir with config.json and safetensors weights                |

Parameter counts are logical: a quantised weight counts its unpacked elements (packed uint32
columns * 32 / bits), its scales and biases count nothing. Adapter rank and targets come from the
tensors themselves (`lora_A` / `lora_a` shapes and the module names they sit on), so they are
right even when a config omits them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from .jsonfile import read_json_object
from .keymaps import FAMILIES
from .shards import FLOAT_DTYPES, TensorInfo, read_header, read_layout

GGUF_MAGIC = b"GGUF"
LORA_A = re.compile(r"^(?:.*\.)?(?P<module>[^.]+)\.(?:lora_A(?:\.[^.]+)?\.weight|lora_a)$")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A dict with at least `format`, `path`, `parameters`; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic == GGUF_MAGIC:
            return _describe_gguf(path)
        if path.suffix == ".safetensors":
            return _describe_safetensors_file(path)
        raise ValueError(f"{path}: neither a GGUF file (magic {magic!r}) nor a .safetensors file")
    if (path / "adapter_config.json").is_file():
        return _describe_adapter(path)
    if (path / "config.json").is_file():
        return _describe_model(path)
    raise ValueError(f"{path}: not a model dir (config.json), an adapter dir "
                     "(adapter_config.json), a GGUF file or a safetensors file")


def _dtype_summary(tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """The float dtype holding most elements, and the tensor count per dtype."""
    by_elements: Counter[str] = Counter()
    for info in tensors.values():
        if info.dtype in FLOAT_DTYPES:
            by_elements[info.dtype] += info.numel
    dtype = by_elements.most_common(1)[0][0] if by_elements else None
    return {"dtype": dtype, "dtypes": dict(Counter(i.dtype for i in tensors.values()))}


def _quantised_params(tensors: dict[str, TensorInfo], entry: dict[str, Any] | None) -> int:
    """Logical parameter count; quantised weights unpacked with their layer's bits."""
    count = 0
    for name, info in tensors.items():
        module, _, suffix = name.rpartition(".")
        quantised = f"{module}.scales" in tensors
        if quantised and suffix in ("scales", "biases"):
            continue
        if quantised and suffix == "weight" and entry:
            layer = entry.get(module)
            bits = int((layer if isinstance(layer, dict) else entry).get("bits", 32))
            count += info.numel * 32 // bits
        else:
            count += info.numel
    return count


def _describe_model(path: Path) -> dict[str, Any]:
    config = read_json_object(path / "config.json")
    tensors = read_layout(path)
    first_file = next(iter(tensors.values())).file if tensors else None
    metadata = read_header(first_file)[0] if first_file else {}
    entry = config.get("quantization")
    is_mlx = entry is not None or metadata.get("format") == "mlx"
    quantisation = None
    if isinstance(entry, dict):
        per_layer = {k: v for k, v in entry.items() if isinstance(v, dict)}
        quantisation = {"mode": entry.get("mode", "affine"), "bits": entry.get("bits"),
                        "group_size": entry.get("group_size"),
                        "quantised_layers": sum(n.endswith(".scales") for n in tensors),
                        "per_layer": {k: v.get("bits") for k, v in per_layer.items()}}
    elif config.get("quantization_config"):
        quantisation = {"mode": config["quantization_config"].get("quant_method", "unknown")}
    model_type = config.get("model_type")
    return {
        "path": str(path),
        "format": "MLX model" if is_mlx else "HF model",
        "architecture": model_type,
        "architectures": config.get("architectures"),
        "hf_mlx_supported": model_type in FAMILIES,
        **_dtype_summary(tensors),
        "quantization": quantisation,
        "parameters": _quantised_params(tensors, entry if isinstance(entry, dict) else None),
        "tensors": len(tensors),
        "files": len({i.file for i in tensors.values()}),
        "size_bytes": sum(i.nbytes for i in tensors.values()),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
    }


def _adapter_tensors(path: Path, names: tuple[str, ...]) -> tuple[Path, dict[str, TensorInfo]]:
    for name in names:
        if (path / name).is_file():
            return path / name, read_header(path / name)[1]
    raise FileNotFoundError(f"{path}: adapter_config.json but no {' or '.join(names)}")


def _describe_adapter(path: Path) -> dict[str, Any]:
    config = read_json_object(path / "adapter_config.json")
    peft = (path / "adapter_model.safetensors").is_file() or (
        "peft_type" in config and not (path / "adapters.safetensors").is_file())
    file, tensors = _adapter_tensors(
        path, ("adapter_model.safetensors",) if peft else ("adapters.safetensors",))
    targets, ranks = set(), set()
    for name, info in tensors.items():
        match = LORA_A.match(name)
        if match:
            targets.add(match["module"])
            ranks.add(info.shape[0] if peft else info.shape[-1])  # PEFT [r, in]; mlx [in, r]
    layers = {int(m.group(1)) for name in tensors if (m := LAYER.search(name))}
    result: dict[str, Any] = {
        "path": str(path),
        "format": "PEFT adapter" if peft else "MLX adapter",
        "weights_file": file.name,
        "rank": max(ranks) if ranks else None,
        "targets": sorted(targets),
        "adapted_layers": len(layers),
        **_dtype_summary(tensors),
        "parameters": sum(i.numel for i in tensors.values()),
        "tensors": len(tensors),
    }
    if peft:
        result.update(peft_type=config.get("peft_type"), config_rank=config.get("r"),
                      lora_alpha=config.get("lora_alpha"), use_dora=config.get("use_dora", False),
                      config_targets=config.get("target_modules"),
                      base_model=config.get("base_model_name_or_path"))
    else:
        lora = config.get("lora_parameters") or {}
        result.update(fine_tune_type=config.get("fine_tune_type", "lora"),
                      config_rank=lora.get("rank"), scale=lora.get("scale"),
                      config_targets=lora.get("keys"), num_layers=config.get("num_layers"),
                      base_model=config.get("model") or config.get("base_model"))
    base = path / "posttrain_base.json"  # written beside the adapters by both trainers
    if base.is_file():
        try:
            record = json.loads(base.read_text())
            result["base_model"] = record.get("base_model") or result.get("base_model")
            result["base_architecture"] = (record.get("architecture") or {}).get("model_type")
            result["base_fingerprint"] = str(record.get("base_fingerprint", ""))[:16] or None
        except (ValueError, AttributeError):
            result["base_record"] = f"{base.name}: unreadable"
    if config.get("init_adapter"):
        result["init_adapter"] = config["init_adapter"]
    return result


def _describe_safetensors_file(path: Path) -> dict[str, Any]:
    metadata, tensors = read_header(path)
    return {"path": str(path), "format": "safetensors file", "metadata": metadata,
            **_dtype_summary(tensors), "parameters": sum(i.numel for i in tensors.values()),
            "tensors": len(tensors), "size_bytes": sum(i.nbytes for i in tensors.values())}


def _describe_gguf(path: Path) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error
    fields = reader.fields

    def field(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    types: Counter[str] = Counter(t.tensor_type.name for t in reader.tensors)
    by_elements: Counter[str] = Counter()
    for tensor in reader.tensors:
        by_elements[tensor.tensor_type.name] += int(tensor.n_elements)
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    arch = field("general.architecture")
    return {
        "path": str(path),
        "format": "GGUF file",
        "architecture": arch,
        "name": field("general.name"),
        "dtype": by_elements.most_common(1)[0][0] if by_elements else None,
        "quantization": {"file_type": file_type_name, "tensor_types": dict(types)},
        "parameters": sum(by_elements.values()),
        "tensors": len(reader.tensors),
        "size_bytes": path.stat().st_size,
        "layers": field(f"{arch}.block_count"),
        "context_length": field(f"{arch}.context_length"),
    }


def format_description(info: dict[str, Any]) -> str:
    """`key: value` lines, with parameters and sizes made readable."""
    lines = []
    for key, value in info.items():
        if key == "parameters" and isinstance(value, int):
            value = f"{value:,} ({value / 1e6:.2f}M)"
        elif key == "size_bytes" and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from .models import resolve_input

    info = describe(resolve_input(args.path))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="say what a model / adapter dir or a GGUF / safetensors file is",
        description="Print format, architecture, dtype, quantisation, parameter count and, for "
                    "adapters, rank and target modules. Reads only configs and headers.")
    parser.add_argument("path", help="a model dir, adapter dir, .gguf or .safetensors file, or a "
                                        "model Hub id")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=_info)
