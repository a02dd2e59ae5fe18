"""Rebuild a Hugging Face tokenizer from a GGUF file's metadata (direction: GGUF -> HF).

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
the BPE merges (`tokenizer.ggml.merges`), a type per token (`tokenizer.ggml.token_type`), the
special token ids and the name of the pre-tokenizer (`tokenizer.ggml.pre`) as metadata. This
module turns those back into the three files `transformers.AutoTokenizer` reads:
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, the GPT-2 / Llama-3 / Qwen / SmolLM family)
is supported so far. The split rules come from llama.cpp's `llama-vocab.cpp`, keyed by
`tokenizer.ggml.pre`, because the merges only reproduce the original ids when the text is cut
into words the same way they were learned.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp's `llama_token_type` values (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (word split, ignore_merges). "gpt2" is ByteLevel's own GPT-2 regex;
# "digits" is that regex after cutting every digit into its own word (StarCoder-style vocabularies).
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "gpt-2": ("gpt2", False),
    "gpt2": ("gpt2", False),
    "smollm": ("digits", False),
    "starcoder": ("digits", False),
    "refact": ("digits", False),
    "llama-bpe": (_LLAMA3_SPLIT, True),
    "llama3": (_LLAMA3_SPLIT, True),
    "qwen2": (_QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}


def _pre_tokenizer(source: str, meta: dict[str, Any]) -> tuple[Any, bool]:
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    split, ignore_merges = PRE_TOKENIZERS[pre]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True), ignore_merges
    if split == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True),
        ]), ignore_merges
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False),
    ]), ignore_merges


def _token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return tokens[int(token_id)]


def build_tokenizer(source: str, meta: dict[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF's metadata describes; `source` names the file in errors."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model = {kind!r} is not supported "
            "(supported: 'gpt2', byte-level BPE)"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"{source}: metadata key {key} is missing")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")
    merges = []
    for merge in meta["tokenizer.ggml.merges"]:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'a b'")
        merges.append((left, right))

    pre_tokenizer, ignore_merges = _pre_tokenizer(source, meta)
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()

    # Control (and unknown) tokens are special; user-defined ones are matched whole but decoded.
    added = [
        AddedToken(token, normalized=False, special=token_type in (CONTROL, UNKNOWN))
        for token, token_type in zip(tokens, types)
        if token_type in (CONTROL, UNKNOWN, USER_DEFINED)
    ]
    tokenizer.add_tokens(added)

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos, eos = _token(meta, tokens, "bos_token_id"), _token(meta, tokens, "eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = [f"{bos}:0"] if add_bos else []
        tail = [f"{eos}:0"] if add_eos else []
        specials = [(t, vocab[t]) for t in {bos if add_bos else None, eos if add_eos else None} if t]
        template = processors.TemplateProcessing(
            single=" ".join(head + ["$A:0"] + tail),
            pair=" ".join(head + ["$A:0"] + tail + head + ["$B:1"] + tail),
            special_tokens=specials,
        )
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def tokenizer_files(
    source: str, meta: dict[str, Any], model_max_length: int | None = None
) -> dict[str, str]:
    """`{file name: text}` for tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tokenizer = build_tokenizer(source, meta)
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    special = {
        name: _token(meta, tokens, key)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    if special["pad_token"] is None:
        special["pad_token"] = special["eos_token"]
    named = set(special.values())
    extra = [t for t, kind in zip(tokens, types) if kind == CONTROL and t not in named]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        **special,
        "additional_special_tokens": extra,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    special_map = {k: v for k, v in special.items() if v is not None}
    special_map["additional_special_tokens"] = extra
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
    }
