"""What both backends share when a sequence-classification checkpoint is used as a reward.

``rewards.ModelReward`` calls ``score_texts(texts)``; each backend runs its own model, but the
text, tokenisation and pooled position are decided here, once, so MLX and torch score alike:

- text: ``prompt + completion`` for strings; the tokenizer's chat template over
  ``prompt_messages + completion_messages`` for chat data;
- batch: right-padded token ids, no special tokens added beyond the template's;
- pooled position (transformers' ``*ForSequenceClassification`` rule): the last token that is
  not the pad id; reward = ``score(h_pool)[0]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def check_reward_model_dir(path: str | Path) -> dict:
    """The checkpoint's config; an error naming the file unless it is a 1-label classifier."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"reward model {path}: no config.json (expected an HF model dir)")
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{config_file}: architectures {archs} has no *ForSequenceClassification;"
                         " a reward model must be a sequence-classification checkpoint")
    return config


def make_format_text(tokenizer: Any):
    def format_text(prompt: Any, completion: Any) -> str:
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion = (completion if isinstance(completion, list)
                          else [{"role": "assistant", "content": completion}])
            return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return f"{prompt}{completion}"

    return format_text


def encode_texts(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``[B, T]`` int32 ids and the pooled index of each row."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    positions = np.arange(width)[None, :] * (ids != pad)
    return ids, positions.argmax(axis=1)
