"""GGUF test helpers shared by test_convert_gguf*.py: an independent q/k permutation and a
GGUF writer with any tensor type (gguf.quants.quantize where the package can quantise, random
blocks with sane d / dmin for the K-quants it cannot)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from converters.gguf_tokenizer import gguf_tokenizer_fields
from converters.hf_to_gguf import add_gguf_metadata, plan_tensors, read_hf_config

Q = gguf.GGMLQuantizationType


def permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation, written independently of converters.gguf_read."""
    head_dim = weight.shape[0] // n_head
    out = np.empty_like(weight)
    for h in range(n_head):
        rows = weight[h * head_dim:(h + 1) * head_dim]
        out[h * head_dim:(h + 1) * head_dim:2] = rows[:head_dim // 2]  # first half -> even rows
        out[h * head_dim + 1:(h + 1) * head_dim:2] = rows[head_dim // 2:]
    return out


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute` (through its index permutation, not converters' reshape)."""
    return weight[np.argsort(permute(np.arange(weight.shape[0]), n_head))]


def heads_for(name: str, family: str, heads: tuple[int, int] = (4, 2)) -> int:
    """The head count llama.cpp permuted `name`'s rows with (0: not permuted); tiny: 4 q, 2 kv."""
    if family != "llama":
        return 0
    module = name.split(".", 3)[-1].removesuffix(".weight")
    return {"self_attn.q_proj": heads[0], "self_attn.k_proj": heads[1]}.get(module, 0)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# d / dmin byte offsets in ggml's K-quant block structs (the rest of a block is random bits);
# Q8_K (which gguf cannot dequantise) is only ever refused, so its bytes are all random.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
            Q.Q8_K: ()}


def encode(values: np.ndarray, qtype, rng) -> np.ndarray:
    if qtype not in K_SCALES:
        return gguf.quants.quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = values.shape[0]
    raw = rng.integers(0, 256, (rows, values.shape[1] // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        scale = rng.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, hf_dir: Path, types: dict[str, object], seed: int = 0) -> dict:
    """A GGUF of `hf_dir` with tensor types chosen by `types` (HF suffix -> type, "" = default);
    returns {gguf name: (raw data, type)}. Metadata as hf_to_gguf writes it."""
    config, rng = read_hf_config(hf_dir), np.random.default_rng(seed)
    writer, raw = gguf.GGUFWriter(path, config["model_type"]), {}
    add_gguf_metadata(writer, config, "t", 0, gguf_tokenizer_fields(hf_dir, config["vocab_size"]))
    for item in plan_tensors(hf_dir, config, Q.F32):
        values = item.source.read()
        qtype = next((t for s, t in types.items() if s and item.name.endswith(s)), types[""])
        if values.ndim == 1 and qtype not in (Q.F16, Q.BF16):
            qtype = Q.F32
        if item.permute_heads:
            values = permute(values, item.permute_heads)
        raw[item.name] = (encode(values, qtype, rng), qtype)
        writer.add_tensor(item.name, raw[item.name][0], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw
