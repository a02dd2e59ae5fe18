"""Tokenizers between GGUF metadata and Hugging Face files, in both directions.

GGUF -> HF: `tokenizer_files(source, meta)`. HF -> GGUF: `gguf_tokenizer_fields(model_dir, ...)`.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
the BPE merges (`tokenizer.ggml.merges`), a type per token (`tokenizer.ggml.token_type`), the
special token ids and the name of the pre-tokenizer (`tokenizer.ggml.pre`) as metadata. This
module turns those back into the three files `transformers.AutoTokenizer` reads:
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, the GPT-2 / Llama-3 / Qwen / SmolLM family)
is supported so far; SentencePiece-style ("llama": Llama-2, Mistral, TinyLlama) is refused by name. The split rules come from llama.cpp's `llama-vocab.cpp`, keyed by
`tokenizer.ggml.pre`, because the merges only reproduce the original ids when the text is cut
into words the same way they were learned.
"""

from __future__ import annotations

import json
from pathlib import Path
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


# ------------------------------------------------------------------ HF -> GGUF (the inverse)


def _pre_tokenizer_json(name: str) -> Any:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer(name, {"tokenizer.ggml.pre": name})[0]
    return _without_trim(json.loads(tokenizer.to_str())["pre_tokenizer"])


def _without_trim(node: Any) -> Any:
    """trim_offsets only moves offsets, never the split: ignore it when comparing."""
    if isinstance(node, dict):
        return {k: _without_trim(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_without_trim(v) for v in node]
    return node


def pre_tokenizer_name(path: Path, pre_tokenizer: Any) -> str:
    """The `tokenizer.ggml.pre` name whose split rules equal tokenizer.json's pre_tokenizer."""
    wanted = _without_trim(pre_tokenizer)
    for name in PRE_TOKENIZERS:  # canonical names come first in the table
        if _pre_tokenizer_json(name) == wanted:
            return name
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:200]} matches none of "
                     f"the llama.cpp pre-tokenizers this converter knows "
                     f"({', '.join(sorted(set(PRE_TOKENIZERS)))})")


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _adds_special(post_processor: Any, position: int) -> bool:
    """Whether a TemplateProcessing post-processor puts a special token first (0) / last (-1)."""
    if not isinstance(post_processor, dict):
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds_special(p, position) for p in post_processor.get("processors", []))
    single = post_processor.get("single") or []
    return post_processor.get("type") == "TemplateProcessing" and bool(single) \
        and "SpecialToken" in single[position]


def gguf_tokenizer_fields(model_dir: Path, vocab_size: int,
                          config: dict[str, Any] | None = None) -> dict[str, Any]:
    """tokenizer.* metadata (llama.cpp's names, see gguf.Keys.Tokenizer) for an HF model dir.

    Byte-level BPE only: tokens padded with UNUSED "[PAD<i>]" up to `vocab_size` rows,
    added tokens CONTROL (special) or USER_DEFINED, merges as "a b".
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a fast tokenizer.json is needed; a "
                                "SentencePiece tokenizer.model alone is not supported)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else model.get("type")
        raise ValueError(f"{path}: model {kind!r} is not supported (supported: byte-level BPE, "
                         "written as tokenizer.ggml.model 'gpt2')")
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: normalizer {normalizer!r} is not supported (none or NFC)")
    pre = pre_tokenizer_name(path, data.get("pre_tokenizer"))
    ids = {token: int(i) for token, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    ids.update({t["content"]: i for i, t in added.items()})
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{path}: token id {max(ids.values())} does not fit the model's "
                         f"vocab_size {vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i], types[i] = token, NORMAL
    for i, entry in added.items():
        types[i] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges}
    model_config = config or {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        token = _special(tok_config, f"{name}_token")
        token_id = ids.get(token) if token is not None else model_config.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            fields[f"tokenizer.ggml.{key}"] = int(token_id)
    post = data.get("post_processor")
    for flag, position in (("add_bos_token", 0), ("add_eos_token", -1)):
        value = tok_config.get(flag)
        fields[f"tokenizer.ggml.{flag}"] = bool(_adds_special(post, position)
                                                if value is None else value)
    template = tok_config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        fields["tokenizer.chat_template"] = template
    return fields
