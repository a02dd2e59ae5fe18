"""Hugging Face (or fused) llama-family model directory -> one GGUF file (direction: HF -> GGUF).

    hf_to_gguf("runs/sft/merged", "model.f16.gguf", outtype="f16")

Reads config.json, tokenizer.json / tokenizer_config.json (+ chat_template.jinja) and the
safetensors weights (one file or shards; F32 / F16 / BF16) and writes what llama.cpp's
`convert_hf_to_gguf.py` writes for `llama` and `qwen2`:

- tensor names from gguf's own table (`gguf.TENSOR_NAMES`, via converters/gguf_read.py);
- llama q_proj / k_proj rows (and biases) permuted to llama.cpp's interleaved rotary layout,
  `permute_rotary(w, n_head)` (k uses the kv head count); qwen2 is not permuted;
- 1-D tensors (norms, biases) in F32; matrices in `outtype` (a block type falls back to F16 for
  a row length that is not a multiple of 32); Q8_0 / Q4_0 / Q4_1 blocks by `gguf.quants.quantize`;
- metadata `general.*`, `<arch>.*` (context / embedding / feed-forward length, block count, head
  counts, rope base and dimension count, rms epsilon, vocab size) and `tokenizer.ggml.*`
  (model "gpt2", pre, tokens, token_type, merges, special ids, add_bos/eos, chat_template).

Streaming: every check runs first (config, tokenizer, tensor names / shapes / dtypes); then the
GGUF header and tensor table are written from the plan and each tensor is read (memory-mapped),
converted, written and dropped, into a temporary sibling file renamed at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_output_file, check_output_file
from .gguf_read import ARCHITECTURES, expected_shapes, gguf_tensor_name, permute_rotary
from .gguf_tokenizer import gguf_tokenizer_fields

Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
OUTTYPES = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16),
            "bf16": (Q.BF16, F.MOSTLY_BF16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
            "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1)}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry, not weights


@dataclass(frozen=True)
class SourceTensor:
    """One tensor inside a safetensors file: enough to memory-map it later."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    def read(self) -> np.ndarray:
        """float32 values (BF16 widened exactly: its bits are float32's top half)."""
        raw = np.memmap(self.path, np.uint8, "r", self.start, self.end - self.start)
        values = raw.view(_ST_DTYPES[self.dtype]).reshape(self.shape)
        if self.dtype == "BF16":
            return (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32)


def safetensors_index(path: Path) -> dict[str, SourceTensor]:
    """The tensor table of one safetensors file, from its JSON header (no data read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a safetensors file ({error})") from error
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']} (supported: "
                             f"{', '.join(_ST_DTYPES)}); quantised weights must be dequantised first")
        start, end = (8 + size + int(o) for o in info["data_offsets"])
        tensors[name] = SourceTensor(path, name, info["dtype"], tuple(info["shape"]), start, end)
    return tensors


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json normalised to the fields gguf_read uses (defaults as transformers has them)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {model_dir} is not a Hugging Face model dir")
    raw = json.loads(path.read_text())
    arch = raw.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type = {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    if "quantization" in raw:
        raise ValueError(f"{path}: an MLX-quantised model; dequantise it first")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(raw.get(k), int)]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} missing or not an integer")
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                          else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise ValueError(f"{path}: rope scaling {scaling} is not supported (only linear)")
    heads = int(raw["num_attention_heads"])
    config = {
        "model_type": arch, "vocab_size": int(raw["vocab_size"]),
        "hidden_size": int(raw["hidden_size"]), "intermediate_size": int(raw["intermediate_size"]),
        "num_hidden_layers": int(raw["num_hidden_layers"]), "num_attention_heads": heads,
        "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
        "head_dim": int(raw.get("head_dim") or raw["hidden_size"] // heads),
        "max_position_embeddings": int(raw.get("max_position_embeddings", 2048)),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "rope_scaling": scaling, "tie_word_embeddings": bool(raw.get("tie_word_embeddings")),
        "attention_bias": bool(raw.get("attention_bias")), "mlp_bias": bool(raw.get("mlp_bias")),
    }
    config.update({k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return config


def source_tensors(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the model's safetensors files (shards listed by the index, if any)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / name for name in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
        tensors.update(safetensors_index(path))
    return tensors


@dataclass(frozen=True)
class PlannedGGUFTensor:
    name: str
    source: SourceTensor
    qtype: gguf.GGMLQuantizationType
    permute_heads: int


def _tensor_type(shape: tuple[int, ...], outtype: gguf.GGMLQuantizationType):
    if len(shape) == 1:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[outtype]
    return outtype if shape[-1] % block == 0 else Q.F16


def plan_tensors(model_dir: Path, config: dict[str, Any], outtype: gguf.GGMLQuantizationType
                 ) -> list[PlannedGGUFTensor]:
    """Check every source tensor against the config and decide its GGUF name and type."""
    wanted = expected_shapes(config)
    found = source_tensors(model_dir)
    heads = {"self_attn.q_proj": config["num_attention_heads"],
             "self_attn.k_proj": config["num_key_value_heads"]}
    permute = ARCHITECTURES[config["model_type"]].permute_qk
    planned = []
    for name, source in found.items():
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight"
                                               and config["tie_word_embeddings"]):
            continue
        if name.endswith((".scales", ".biases")):
            raise ValueError(f"{source.path}: tensor {name} is MLX-quantised; dequantise the "
                             "model first (GGUF export takes float weights)")
        if name not in wanted:
            raise ValueError(f"{source.path}: tensor {name} has no place in a "
                             f"{config['model_type']} model of this config")
        if source.shape != wanted[name]:
            raise ValueError(f"{source.path}: tensor {name} has shape {list(source.shape)}, "
                             f"config.json implies {list(wanted[name])}")
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]
        n_head = heads.get(module, 0) if permute else 0
        planned.append(PlannedGGUFTensor(gguf_tensor_name(name), source,
                                         _tensor_type(source.shape, outtype), n_head))
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{model_dir}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    order = {name: i for i, name in enumerate(wanted)}  # embeddings, layers in order, norm, head
    return sorted(planned, key=lambda t: order[t.source.name])


def _encode(item: PlannedGGUFTensor) -> np.ndarray:
    values = item.source.read()
    if item.permute_heads:
        values = permute_rotary(values, item.permute_heads)
    if item.qtype == Q.F16:
        out = values.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(values).all():
            raise ValueError(f"{item.source.path}: tensor {item.source.name} overflows float16; "
                             "use outtype bf16 or f32")
        return out
    return gguf.quants.quantize(values, item.qtype)


def add_gguf_metadata(writer: gguf.GGUFWriter, config: dict[str, Any], name: str,
                      file_type: int, tokenizer: dict[str, Any]) -> None:
    """general.*, <arch>.* and tokenizer.* keys (gguf.Keys names) for a `read_hf_config` config."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if config["rope_scaling"]:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tokenizer["tokenizer.ggml.pre"])
    writer.add_token_list(tokenizer["tokenizer.ggml.tokens"])
    writer.add_token_types(tokenizer["tokenizer.ggml.token_type"])
    writer.add_token_merges(tokenizer["tokenizer.ggml.merges"])
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in tokenizer:
            writer.add_uint32(f"tokenizer.ggml.{key}", tokenizer[f"tokenizer.ggml.{key}"])
    writer.add_add_bos_token(tokenizer["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(tokenizer["tokenizer.ggml.add_eos_token"])
    if "tokenizer.chat_template" in tokenizer:
        writer.add_chat_template(tokenizer["tokenizer.chat_template"])


def _is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (what ``--force`` may replace)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def hf_to_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f16",
               force: bool = False, name: str | None = None) -> Path:
    """Write the llama / qwen2 model at `model_dir` as the GGUF file `out_file`; returns it.

    `outtype`: f16 (default), q8_0, bf16, f32, q4_0 or q4_1. Everything is checked before the
    file is opened; the file appears whole (temporary sibling renamed) or not at all, and an
    existing `out_file` is replaced only with `force`.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype = {outtype!r} is not supported (choose from {', '.join(OUTTYPES)})")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    check_output_file(out_file, force, _is_gguf)
    qtype, file_type = OUTTYPES[outtype]
    config = read_hf_config(model_dir)
    planned = plan_tensors(model_dir, config, qtype)
    tokenizer = gguf_tokenizer_fields(model_dir, config["vocab_size"], config)
    with atomic_output_file(out_file, force, _is_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, config["model_type"])
        try:
            add_gguf_metadata(writer, config, name or model_dir.resolve().name, file_type, tokenizer)
            for item in planned:
                block, size = gguf.GGML_QUANT_SIZES[item.qtype]
                nbytes = int(np.prod(item.source.shape)) // block * size
                writer.add_tensor_info(item.name, item.source.shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=item.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in planned:
                writer.write_tensor_data(_encode(item))
        finally:
            writer.close()
    return out_file
