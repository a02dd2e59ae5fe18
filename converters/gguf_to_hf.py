"""GGUF file -> Hugging Face model directory (direction: GGUF -> HF; llama architecture).

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")   # -> Path("smollm2-hf")

writes `config.json` (LlamaForCausalLM), `generation_config.json`, `model.safetensors` and the
tokenizer files, loadable by `transformers.AutoModelForCausalLM` / `AutoTokenizer` and
`mlx_lm.load`. Every tensor is dequantised with the `gguf` library (whatever quant types it
implements) and stored in `dtype`.

Two things llama.cpp's `convert_hf_to_gguf.py` does to llama weights are undone here:

- GGUF lists dimensions fastest-first (`ne0, ne1`), the reverse of numpy / torch order;
- q_proj and k_proj rows are permuted within each head, from HF's "rotate half" rotary layout to
  llama.cpp's interleaved pairs: `w.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2)`.
  `unpermute_rotary` is its exact inverse (k_proj uses the kv head count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_output_dir, check_output_dir
from .gguf_tokenizer import tokenizer_files

SUPPORTED_ARCHITECTURES = ("llama",)
DTYPES = ("float32", "float16", "bfloat16")

# GGUF name (without .weight / .bias) -> HF name. Both maps are one-to-one, so they invert.
LLAMA_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# blk.{i}.<gguf> -> model.layers.{i}.<hf>
LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name for a llama GGUF tensor name, or None when it has none."""
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in LLAMA_GLOBAL_NAMES:
        return f"{LLAMA_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LLAMA_BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{LLAMA_BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permute: interleaved rotary pairs back to HF's rotate-half rows."""
    head_dim = weight.shape[0] // n_head
    rest = weight.shape[1:]
    return weight.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key-value field of a GGUF as plain Python values (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first


def _short_float(value: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05, as the source config wrote it."""
    return float(str(np.float32(value)))


def llama_config(source: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from llama.* metadata and the tensor shapes."""
    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ValueError(f"{source}: metadata key llama.{key} is missing")
        value = meta[f"llama.{key}"]
        if np.ndim(value) != 0:
            raise ValueError(f"{source}: llama.{key} varies per layer; not supported")
        return value

    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise ValueError(f"{source}: llama.expert_count = {meta['llama.expert_count']} "
                         "(mixture of experts) is not supported")
    if "rope_freqs.weight" in shapes:
        raise ValueError(f"{source}: tensor rope_freqs.weight (llama3 rope scaling) is not supported")
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source}: tensor token_embd.weight is missing")

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{source}: llama.rope.dimension_count = {rope_dim} differs from the "
                         f"head size {head_dim} (partial rotary is not llama)")
    rope_scaling = None
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{source}: llama.rope.scaling.type = {scaling!r} is not supported")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _short_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _short_float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_up.bias" in shapes,
        "tie_word_embeddings": "output.weight" not in shapes,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    for name in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        config[f"{name}_token_id"] = int(meta[key]) if key in meta else None
    return config


def _dequantize(source: Path, tensor: gguf.ReaderTensor) -> np.ndarray:
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise ValueError(f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
                         "the installed gguf library cannot dequantise") from error
    return np.asarray(values, dtype=np.float32).reshape(_shape(tensor))


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r} is not supported (choose from {', '.join(DTYPES)})")
    if dtype == "bfloat16":
        try:
            import safetensors.torch  # noqa: F401
            import torch  # noqa: F401
        except ImportError as error:
            raise ImportError("dtype='bfloat16' needs torch (numpy has no bfloat16): "
                              "pip install torch, or use dtype='float32' / 'float16'") from error


def save_weights(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    """model.safetensors in `dtype` from float32 numpy arrays."""
    metadata = {"format": "pt"}
    if dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(np.array(v, dtype=np.float32)).to(torch.bfloat16)
                    for k, v in tensors.items()}, str(path), metadata=metadata)
        return
    from safetensors.numpy import save_file

    out = {}
    for name, value in tensors.items():
        cast = np.ascontiguousarray(value, dtype=np.float16 if dtype == "float16" else np.float32)
        if dtype == "float16" and not np.isfinite(cast).all():
            raise ValueError(f"tensor {name} overflows float16; use dtype='bfloat16' or 'float32'")
        out[name] = cast
    save_file(out, str(path), metadata=metadata)


def _convert_tensors(source: Path, reader: gguf.GGUFReader,
                     config: dict[str, Any]) -> dict[str, np.ndarray]:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None:
            raise ValueError(f"{source}: tensor {tensor.name} has no Hugging Face llama name")
        value = _dequantize(source, tensor)
        role = tensor.name.split(".")[-2]
        if role in heads:
            value = unpermute_rotary(value, heads[role])
        tensors[hf_name] = value
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{i}.{name}.weight" for name in LLAMA_BLOCK_NAMES.values())
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return tensors


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
               dtype: str = "float32", force: bool = False) -> Path:
    """Import a llama GGUF as a Hugging Face model directory at `out_dir`; returns `out_dir`.

    Nothing is written until the file has been checked; then the directory appears all at once
    (written to a temporary sibling and renamed), so a failure never leaves a partial model.
    An existing `out_dir` is an error unless `force`.
    """
    source, out_dir = Path(gguf_path), Path(out_dir)
    _check_dtype(dtype)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    check_output_dir(out_dir, force)
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, OSError) as error:
        raise ValueError(f"{source}: not a readable GGUF file ({error})") from error
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture = {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    config = llama_config(source, meta, {t.name: _shape(t) for t in reader.tensors}, dtype)
    files = tokenizer_files(str(source), meta, config["max_position_embeddings"])
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config[k] is not None}
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"

    with atomic_output_dir(out_dir, force) as tmp:
        save_weights(_convert_tensors(source, reader, config), tmp / "model.safetensors", dtype)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir
