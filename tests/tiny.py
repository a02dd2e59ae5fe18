"""Tiny deterministic test fixtures built in code: a byte-level BPE tokenizer, Llama/Qwen2 models.

No network, no torch, no mlx: the tokenizer is trained with the ``tokenizers`` library on a fixed
corpus embedded below, the model weights are drawn with numpy and written with safetensors. The
same call with the same arguments writes byte-identical files.

- ``make_tiny_tokenizer(dir)``: ~384 tokens (256 byte alphabet + 3 specials + merges), ChatML
  template (``<|im_start|>{role}\\n{content}<|im_end|>\\n``), eos ``<|im_end|>``, pad
  ``<|endoftext|>``, no BOS. Offsets mapping works (fast tokenizer, untrimmed offsets).
- ``make_tiny_model(dir, family="llama"|"qwen2"|...)``: an HF model dir loadable by
  ``transformers.AutoModelForCausalLM`` and ``mlx_lm.load``, with the tokenizer files beside it.
  Families: llama, qwen2 (the training tests' models) and, for the converter tests, mistral,
  qwen3 (q_norm / k_norm), gemma and gemma2 (always tied; norm weights stored as offsets w of
  ``1 + w``), phi3 (fused qkv_proj / gate_up_proj).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 384

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is the
capital of France. What is two plus two? Two plus two is four. The answer is 4.
Please write a short poem about the sea. The sea is blue and the sky is wide.
user assistant system tool function name arguments content role message
You are a helpful assistant. Think step by step, then give the final answer.
The weather is sunny and warm. It will rain tomorrow in the north of the country.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024. Lists, tables, and code: def f(x): return x + 1
Data is loaded from a JSON lines file; each line holds one example with a prompt and a completion.
"""

# HF renders templates with trim_blocks=True: a newline right after a {% ... %} tag is dropped,
# so newlines that must survive sit after {{ ... }} expressions or literal text.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}"
    "{% endif %}"
    "You can call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and tools and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}"
    "{% for call in message.tool_calls %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if not loop.first or message.content %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ fn.name }}\", \"arguments\": {{ fn.arguments | tojson }}}\n"
    "</tool_call>"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _build_tokenizer_object():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: a token's character span includes its leading space, so a character
    # span covers whole tokens (the data layer marks loss tokens by character span).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def make_tiny_tokenizer(directory: str | Path) -> Path:
    """Write the tiny ChatML tokenizer (``tokenizer.json`` + config) into ``directory``."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer_object(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(directory))
    return directory


def _tokenizer_ids(directory: Path) -> tuple[int, int, int]:
    data = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    vocab = len(data["model"]["vocab"]) + sum(t["id"] >= len(data["model"]["vocab"])
                                              for t in data["added_tokens"])
    return ids["<|im_end|>"], ids["<|endoftext|>"], vocab


FAMILIES = {  # family -> transformers architecture
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _family_config(family: str, layers: int, head_dim: int, pad_id: int) -> dict:
    """The config.json entries one family adds to the shared ones."""
    if family == "llama":
        return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if family in ("qwen2", "qwen3"):
        extra = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": layers}
        return extra if family == "qwen2" else {**extra, "attention_bias": False}
    if family == "mistral":
        return {"sliding_window": None}
    if family == "phi3":
        return {"pad_token_id": pad_id, "original_max_position_embeddings": 512,
                "partial_rotary_factor": 1.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "sliding_window": None}
    extra = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
             "attention_bias": False}
    if family == "gemma2":  # windows longer than any test sequence: mlx-lm's gemma2 has none
        extra.update(query_pre_attn_scalar=head_dim, attn_logit_softcapping=50.0,
                     final_logit_softcapping=30.0, sliding_window=512)
    return extra


def make_tiny_model(
    directory: str | Path,
    family: str = "llama",
    seed: int = 0,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Write a tiny HF model dir (config, float32 safetensors, tokenizer) from numpy.

    Weights ~ Normal(0, 0.02) from ``np.random.default_rng(seed)`` in a fixed key order; RMSNorm
    weights are 1 + Normal(0, 0.02) so norms are not exactly the identity (catches shifted norms);
    gemma-style norms store the offset, Normal(0, 0.02). ``tie_word_embeddings=None`` means the
    family's default: tied for gemma / gemma2 (which cannot be untied), untied otherwise.
    """
    from safetensors.numpy import save_file

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    gemma_like = family in ("gemma", "gemma2")
    if tie_word_embeddings is None:
        tie_word_embeddings = gemma_like
    if gemma_like and not tie_word_embeddings:
        raise ValueError(f"{family} always ties lm_head to embed_tokens")
    directory = Path(directory)
    make_tiny_tokenizer(directory)
    eos_id, pad_id, tok_vocab = _tokenizer_ids(directory)
    vocab = vocab_size or tok_vocab
    if vocab < tok_vocab:
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer's {tok_vocab} tokens")
    head_dim = hidden_size // heads
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        if gemma_like:  # gemma computes x * (1 + w): the stored weight is the offset
            return rng.normal(0.0, 0.02, size=(n,)).astype(np.float32)
        return (1.0 + rng.normal(0.0, 0.02, size=(n,))).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab, hidden_size)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden_size)
        if family == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = normal((heads + 2 * kv_heads) * head_dim,
                                                        hidden_size)
        else:
            w[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden_size)
            w[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden_size)
            w[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden_size)
        if family == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        if family == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(heads * head_dim)
            w[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim)
            w[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim)
        w[p + "self_attn.o_proj.weight"] = normal(hidden_size, heads * head_dim)
        w[p + "post_attention_layernorm.weight"] = norm(hidden_size)
        if family == "gemma2":
            w[p + "pre_feedforward_layernorm.weight"] = norm(hidden_size)
            w[p + "post_feedforward_layernorm.weight"] = norm(hidden_size)
        if family == "phi3":
            w[p + "mlp.gate_up_proj.weight"] = normal(2 * intermediate, hidden_size)
        else:
            w[p + "mlp.gate_proj.weight"] = normal(intermediate, hidden_size)
            w[p + "mlp.up_proj.weight"] = normal(intermediate, hidden_size)
        w[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate)
    w["model.norm.weight"] = norm(hidden_size)
    if not tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab, hidden_size)
    save_file(w, str(directory / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    config.update(_family_config(family, layers, head_dim, pad_id))
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


# --- batches in the layout of algorithms.backend, for backend tests ---------------------------
PAD = 0
DOC_A = [5, 17, 100, 200, 3, 44, 255]
DOC_B = [300, 1, 2, 7, 9, 120, 64, 33]
DOC_C = [11, 12, 13, 14]
DOC_D = [250, 251, 40, 41, 42, 43, 90, 91, 92]


def make_batch(rows: list[list[list[int]]], length: int | None = None) -> dict[str, np.ndarray]:
    """Rows of documents -> the [B, T] layout of algorithms.backend (right padding, 1-based ids)."""
    length = length or max(sum(len(d) for d in row) for row in rows)
    shape = (len(rows), length)
    batch = {"input_ids": np.full(shape, PAD, np.int32), "targets": np.full(shape, PAD, np.int32),
             "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32)}
    for b, row in enumerate(rows):
        start = 0
        for seg, doc in enumerate(row, start=1):
            end = start + len(doc)
            batch["input_ids"][b, start:end] = doc
            batch["targets"][b, start:end - 1] = doc[1:]
            batch["loss_mask"][b, start:end - 1] = 1.0
            batch["segment_ids"][b, start:end] = seg
            start = end
    batch["num_items"] = np.float32(batch["loss_mask"].sum())
    return batch
