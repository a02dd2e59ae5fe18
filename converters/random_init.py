"""Random-init Llama-family HF model dirs of a given size class, for benchmarks and memory tests.

    make_random_model("runs/rand1b", "1b")            # ~1.07B parameters, bfloat16, no download

The weights never exist in memory all at once: each tensor is drawn from its own generator
(keyed by ``(seed, tensor index)``), converted, and streamed into a safetensors shard, so a
1B-class model is written with one tensor's worth of RAM. The safetensors format is written by
hand (8-byte header length, JSON header, raw little-endian data) because numpy has no bfloat16.
The tokenizer files are copied from a tokenizer dir (default: the SmolLM2 cache when it exists);
the vocabulary size follows the tokenizer.

numpy (and the standard library) only: no mlx, no torch, so any process may call it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_word_embeddings: bool = True


# Size classes: "135m" and "360m" are SmolLM2's shapes, "1b" is Llama-3.2-1B's (with the
# tokenizer's vocabulary: 49152 for SmolLM2's, which makes ~1.07B parameters).
SIZES: dict[str, Shape] = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  tie_word_embeddings=False),
    "135m": Shape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536),
    "360m": Shape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560),
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
    "3b": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192),
}
FAMILIES = ("llama", "qwen2")
_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def default_tokenizer_dir() -> Path | None:
    """SmolLM2's tokenizer from the posttrain cache, if that model was imported (no import here)."""
    from .models import cache_dir

    path = cache_dir() / "models" / "smollm2-135m-instruct"
    return path if (path / "tokenizer.json").is_file() else None


def tokenizer_vocab(tokenizer_dir: Path) -> tuple[int, int | None, int | None]:
    """(vocabulary size incl. added tokens, eos id, pad id) read from ``tokenizer.json``."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    ids = [int(i) for i in data["model"]["vocab"].values()]
    ids += [int(t["id"]) for t in data.get("added_tokens", [])]
    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    by_content = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    by_content.update({k: int(v) for k, v in data["model"]["vocab"].items()
                       if k in (config.get("eos_token"), config.get("pad_token"))})

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return by_content.get(token) if token else None

    eos = token_id("eos_token")
    pad = token_id("pad_token")
    return max(ids) + 1, eos, (pad if pad is not None else eos)


def parameter_shapes(shape: Shape, vocab: int, family: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor name and shape in HF's key order (the order the shards are written in)."""
    head_dim = shape.hidden // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (shape.hidden,)),
                (p + "self_attn.q_proj.weight", (q, shape.hidden)),
                (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
                (p + "self_attn.v_proj.weight", (kv, shape.hidden))]
        if family == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        out += [(p + "self_attn.o_proj.weight", (shape.hidden, q)),
                (p + "post_attention_layernorm.weight", (shape.hidden,)),
                (p + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
                (p + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
                (p + "mlp.down_proj.weight", (shape.hidden, shape.intermediate))]
    out.append(("model.norm.weight", (shape.hidden,)))
    if not shape.tie_word_embeddings:
        out.append(("lm_head.weight", (vocab, shape.hidden)))
    return out


def count_parameters(size: str, vocab: int = 49152, family: str = "llama") -> int:
    return sum(int(np.prod(s)) for _, s in parameter_shapes(_shape(size), vocab, family))


def _shape(size: str) -> Shape:
    if size not in SIZES:
        raise ValueError(f"size {size!r}: must be one of {', '.join(SIZES)}")
    return SIZES[size]


def _draw(name: str, shape: tuple[int, ...], seed: int, index: int, layers: int) -> np.ndarray:
    """N(0, 0.02) weights (output projections scaled by 1/sqrt(2 * layers), GPT-2 style so the
    residual stream stays O(1) at depth); norms 1 + N(0, 0.02); biases N(0, 0.02)."""
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if name.endswith("norm.weight"):
        x += np.float32(1.0)
    elif name.endswith(("o_proj.weight", "down_proj.weight")):
        x *= np.float32(1.0 / np.sqrt(2.0 * layers))
    return x


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    bits = x.astype("<f4").view("<u4")
    # round to nearest even on the upper 16 bits (no NaNs here: the weights are finite)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...], int]], dtype: str,
                 seed: int, layers: int) -> None:
    """Stream ``tensors`` (name, shape, global index) into one safetensors file."""
    code, width = _DTYPES[dtype]
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = int(np.prod(shape)) * width
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, index in tensors:
            f.write(_encode(_draw(name, shape, seed, index, layers), dtype))
    tmp.replace(path)


def make_random_model(out_dir: str | Path, size: str, family: str = "llama",
                      dtype: str = "bfloat16", seed: int = 0,
                      tokenizer_dir: str | Path | None = None,
                      shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a random-init HF model dir of size class ``size`` (see ``SIZES``); return its path.

    Loadable by ``transformers.AutoModelForCausalLM`` and ``mlx_lm.load``. The same arguments
    write byte-identical weights. ``tokenizer_dir`` defaults to SmolLM2's tokenizer in the
    posttrain cache (``python -m converters import-default`` puts it there).
    """
    shape = _shape(size)
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: must be one of {', '.join(FAMILIES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: must be one of {', '.join(_DTYPES)}")
    source = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()
    if source is None or not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {source or 'the SmolLM2 cache'}; pass tokenizer_dir= a dir "
            "with tokenizer files, or import SmolLM2 first: python -m converters import-default")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    vocab, eos, pad = tokenizer_vocab(source)
    params = parameter_shapes(shape, vocab, family)
    _, width = _DTYPES[dtype]

    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    used = 0
    for index, (name, tensor_shape) in enumerate(params):
        nbytes = int(np.prod(tensor_shape)) * width
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, tensor_shape, index))
        used += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file_name, tensors in zip(names, shards):
        _write_shard(out / file_name, tensors, dtype, seed, shape.layers)
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * width for _, s in params)
        weight_map = {n: f for f, ts in zip(names, shards) for n, _, _ in ts}
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(
        _config(shape, vocab, family, dtype, eos, pad), indent=2) + "\n")
    return out


def _config(shape: Shape, vocab: int, family: str, dtype: str, eos: int | None,
            pad: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"],
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "attention_bias": family == "qwen2",
        "mlp_bias": False,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
