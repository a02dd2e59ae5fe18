"""A sequence-classification checkpoint as a reward function on torch (``model:<path>``)."""

from __future__ import annotations

from pathlib import Path

import torch

from algorithms.reward_models import check_reward_model_dir, encode_texts, make_format_text


def load_reward_model(path: str, batch_size: int = 8):
    """``rewards.ModelReward`` scoring ``prompt + completion`` with the checkpoint's ``logits[:, 0]``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards import ModelReward

    from .device import choose_device

    check_reward_model_dir(path)
    choice = choose_device("auto")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    model.to(choice.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    @torch.no_grad()
    def score_texts(texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            ids, pooled = encode_texts(tokenizer, texts[start:start + batch_size])
            ids_t = torch.from_numpy(ids.astype("int64")).to(choice.device)
            hidden = model.base_model(input_ids=ids_t).last_hidden_state
            rows = torch.arange(len(ids), device=choice.device)
            logits = model.score(hidden[rows, torch.from_numpy(pooled).to(choice.device)].float())
            scores += logits[:, 0].float().cpu().tolist()
        return scores

    return ModelReward(score_texts, name=f"rm_{Path(path).name}",
                       format_text=make_format_text(tokenizer))
