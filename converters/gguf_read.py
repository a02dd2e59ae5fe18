"""Read and check a GGUF model before anything is written (shared by gguf_to_hf and gguf_to_mlx).

    model = open_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config          # config.json for transformers / mlx-lm (LlamaForCausalLM, Qwen2ForCausalLM)
    model.tensors         # [GGUFTensor(gguf name, HF name, numpy shape, type, rows to un-permute)]
    model.tokenizer_files # {file name: text}

Everything that can be wrong with a file is found here, before an output exists: unreadable
file, unknown architecture, missing metadata key, unknown tensor name, shape mismatch, missing
tensor, a quant type the `gguf` library cannot dequantise, an unsupported tokenizer.

Two layout facts of llama.cpp files (direction GGUF -> HF):

- GGUF lists dimensions fastest-first (`ne0, ne1`), the reverse of numpy / torch order;
- for `llama` only, q_proj and k_proj rows were permuted within each head by
  `convert_hf_to_gguf.py`, from HF's rotate-half layout to interleaved pairs:
  `permute_rotary(w, n) = w.reshape(n, 2, head_dim // 2, ...).swapaxes(1, 2)`.
  `unpermute_rotary` is its exact inverse (k_proj uses the kv head count). It moves whole rows,
  so it applies unchanged to quantised rows (blocks run along a row) and to their scales.
  `qwen2` files are not permuted (llama.cpp runs them with NeoX-style rotary).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .gguf_tokenizer import tokenizer_files

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    permute_qk: bool  # llama.cpp permuted q/k rows when it wrote the file


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", permute_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", permute_qk=False),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# gguf's tensor enum -> HF module name; GGUF names come from gguf.TENSOR_NAMES (the spec's table).
GLOBAL_TENSORS = {T.TOKEN_EMBD: "model.embed_tokens", T.OUTPUT_NORM: "model.norm",
                  T.OUTPUT: "lm_head"}
BLOCK_TENSORS = {  # blk.{i}.<gguf> <-> model.layers.{i}.<hf>
    T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj",
    T.ATTN_V: "self_attn.v_proj", T.ATTN_OUT: "self_attn.o_proj",
    T.FFN_NORM: "post_attention_layernorm", T.FFN_GATE: "mlp.gate_proj",
    T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
}
_GLOBAL_TO_HF = {gguf.TENSOR_NAMES[k]: v for k, v in GLOBAL_TENSORS.items()}
_BLOCK_TO_HF = {gguf.TENSOR_NAMES[k].removeprefix("blk.{bid}."): v for k, v in BLOCK_TENSORS.items()}
_GLOBAL_TO_GGUF = {v: k for k, v in _GLOBAL_TO_HF.items()}
_BLOCK_TO_GGUF = {v: k for k, v in _BLOCK_TO_HF.items()}


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if it has none."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_TO_HF:
        return f"{_GLOBAL_TO_HF[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TO_HF:
        return f"model.layers.{int(parts[1])}.{_BLOCK_TO_HF[parts[2]]}.{suffix}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """The inverse of `hf_tensor_name`: `lm_head.weight` -> `output.weight`."""
    stem, dot, suffix = hf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_TO_GGUF:
        return f"{_GLOBAL_TO_GGUF[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
            and parts[3] in _BLOCK_TO_GGUF:
        return f"blk.{int(parts[2])}.{_BLOCK_TO_GGUF[parts[3]]}.{suffix}"
    return None


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (what convert_hf_to_gguf does)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rotary`: interleaved rotary pairs back to HF's rotate-half rows."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key-value field of a GGUF as plain Python values (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def tensor_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """numpy-order shape of a GGUF tensor (GGUF lists dims fastest-first)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _short_float(value: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05, as the source config wrote it."""
    return float(str(np.float32(value)))


def hf_config(source: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
              dtype: str) -> dict[str, Any]:
    """config.json from `<arch>.*` metadata and the tensor shapes (llama and qwen2)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture = {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{source}: metadata key {arch}.{key} is missing")
        value = meta[f"{arch}.{key}"]
        if np.ndim(value) != 0:
            raise ValueError(f"{source}: {arch}.{key} varies per layer; not supported")
        return value

    if int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise ValueError(f"{source}: {arch}.expert_count = {meta[f'{arch}.expert_count']} "
                         "(mixture of experts) is not supported")
    if "rope_freqs.weight" in shapes:
        raise ValueError(f"{source}: tensor rope_freqs.weight (llama3 rope scaling) is not supported")
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source}: tensor token_embd.weight is missing")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count = {rope_dim} differs from the "
                         f"head size {head_dim} (partial rotary is not supported)")
    rope_scaling = None
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{source}: {arch}.rope.scaling.type = {scaling!r} is not supported")
    layers = int(need("block_count"))
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch].hf_class],
        "model_type": arch,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _short_float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _short_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in shapes,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    for name in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        config[f"{name}_token_id"] = int(meta[key]) if key in meta else None
    return config


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the config implies (biases where the model has them)."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}  # in llama.cpp's file order
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows}
        for name, n in rows.items():
            shapes[f"{p}{name}.weight"] = (n, hidden)
            if qkv_bias:
                shapes[f"{p}{name}.bias"] = (n,)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, q_rows)
        if config.get("attention_bias", False):
            shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
        for name, shape in (("mlp.gate_proj", (ffn, hidden)), ("mlp.up_proj", (ffn, hidden)),
                            ("mlp.down_proj", (hidden, ffn))):
            shapes[f"{p}{name}.weight"] = shape
            if config.get("mlp_bias", False):
                shapes[f"{p}{name}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a checked GGUF: where it goes and how to undo llama.cpp's layout."""

    tensor: gguf.ReaderTensor
    hf_name: str
    shape: tuple[int, ...]  # numpy order
    unpermute_heads: int  # > 0: rows to un-permute with this head count

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return self.tensor.tensor_type


@dataclass(frozen=True)
class GGUFModel:
    """A checked GGUF: `meta` holds its metadata (the reader's own fields are dropped)."""

    source: Path
    reader: gguf.GGUFReader
    meta: dict[str, Any]
    config: dict[str, Any]
    tensors: list[GGUFTensor]
    tokenizer_files: dict[str, str]


def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed gguf library implements dequantisation for `qtype`."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, ValueError):
        return False
    return True


CHUNK_VALUES = 1 << 22  # rows dequantised at a time: bounds gguf's temporaries to ~4M values


def dequantize(source: Path, item: GGUFTensor) -> np.ndarray:
    """float32 HF-layout values of one tensor (dequantised by gguf, q/k rows un-permuted).

    Rows are dequantised a chunk at a time into one output array, so the peak is about the
    tensor in float32 plus a chunk (gguf's numpy dequantisers make several temporaries).
    """
    raw = item.tensor.data
    values = np.empty(item.shape, np.float32)
    if len(item.shape) == 1:
        values[:] = gguf.quants.dequantize(raw, item.qtype).reshape(item.shape)
    else:
        step = max(1, CHUNK_VALUES // item.shape[1])
        for start in range(0, item.shape[0], step):
            chunk = gguf.quants.dequantize(raw[start:start + step], item.qtype)
            values[start:start + step] = chunk.reshape(-1, item.shape[1])
    return unpermute_rotary(values, item.unpermute_heads) if item.unpermute_heads else values


def open_gguf(source: Path) -> gguf.GGUFReader:
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    try:
        return gguf.GGUFReader(source)
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"{source}: not a readable GGUF file ({error})") from error


def open_gguf_model(gguf_path: str | os.PathLike, dtype: str = "float32") -> GGUFModel:
    """Open and check a GGUF model (see the module docstring); raises before any output exists."""
    source = Path(gguf_path)
    reader = open_gguf(source)
    meta = read_metadata(reader)
    # The reader keeps a few numpy views per vocabulary entry (~150 MB for 49k tokens + merges);
    # `meta` holds the values now, and the tensors do not need them.
    reader.fields.clear()
    config = hf_config(source, meta, {t.name: tensor_shape(t) for t in reader.tensors}, dtype)
    permute = ARCHITECTURES[config["model_type"]].permute_qk
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    wanted = expected_shapes(config)
    tensors = []
    for tensor in reader.tensors:
        hf_name, shape = hf_tensor_name(tensor.name), tensor_shape(tensor)
        if hf_name is None or hf_name not in wanted:
            raise ValueError(f"{source}: tensor {tensor.name} has no place in a "
                             f"{config['model_type']} model of this config")
        if shape != wanted[hf_name]:
            raise ValueError(f"{source}: tensor {tensor.name} has shape {list(shape)}, the config "
                             f"implies {list(wanted[hf_name])}")
        if not can_dequantize(tensor.tensor_type):
            raise ValueError(f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                             "which the installed gguf library cannot dequantise")
        role = tensor.name.split(".")[-2]
        n_head = heads.get(role, 0) if permute else 0  # llama.cpp permutes q/k biases too
        tensors.append(GGUFTensor(tensor, hf_name, shape, n_head))
    missing = sorted(set(wanted) - {t.hf_name for t in tensors})
    if missing:
        names = [gguf_tensor_name(n) for n in missing[:3]]
        raise ValueError(f"{source}: {len(missing)} tensors missing, e.g. {', '.join(names)}")
    files = tokenizer_files(str(source), meta, config["max_position_embeddings"])
    return GGUFModel(source, reader, meta, config, tensors, files)
