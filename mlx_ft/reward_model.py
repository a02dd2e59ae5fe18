"""A sequence-classification checkpoint as a reward function on MLX (``model:<path>``).

mlx-lm has no classification heads, so the decoder comes from mlx-lm's zoo and the ``score``
head ([num_labels, hidden], transformers' name) is read from the checkpoint and applied here.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from algorithms.reward_models import check_reward_model_dir, encode_texts, make_format_text


def load_reward_model(path: str, batch_size: int = 8):
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from rewards import ModelReward

    check_reward_model_dir(path)
    model, _ = load_model(Path(path), strict=False)
    head = None
    for shard in sorted(Path(path).glob("model*.safetensors")):
        head = mx.load(str(shard)).get("score.weight", head)
    if head is None:
        raise ValueError(f"{path}: no 'score.weight' tensor in model*.safetensors")
    head = head.astype(mx.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    def score_texts(texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            ids, pooled = encode_texts(tokenizer, texts[start:start + batch_size])
            hidden = model.model(mx.array(ids)).astype(mx.float32)
            picked = hidden[mx.arange(len(ids)), mx.array(pooled)]
            scores += np.array(picked @ head.T)[:, 0].tolist()
        return scores

    return ModelReward(score_texts, name=f"rm_{Path(path).name}",
                       format_text=make_format_text(tokenizer))
