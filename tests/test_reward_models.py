"""A sequence-classification checkpoint as a reward (``model:<path>``) on both backends: the same
scores as transformers' own forward, and the same on MLX and torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mlx")

import mlx_ft  # noqa: F401  (OpenBLAS before mlx.core)
from rewards import RewardScorer, load_reward

PROMPTS = ["say red", "say blue", [{"role": "user", "content": "say sun"}]]
COMPLETIONS = [" red red", " blue", [{"role": "assistant", "content": "sun sun sun"}]]


@pytest.fixture(scope="module")
def reward_model_dir(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_llama_dir), num_labels=1, pad_token_id=tok.pad_token_id, dtype=torch.float32)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _transformers_scores(path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_reward_model_scores_match_transformers_on_both_backends(reward_model_dir):
    from cuda_ft.reward_model import load_reward_model as torch_loader
    from mlx_ft.reward_model import load_reward_model as mlx_loader

    on_torch = load_reward(f"model:{reward_model_dir}", model_loader=torch_loader)
    on_mlx = load_reward(f"model:{reward_model_dir}", model_loader=mlx_loader)
    texts = [on_torch.format_text(p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert texts[0] == "say red red red" and texts[2].startswith("<|im_start|>user\nsay sun")
    want = _transformers_scores(reward_model_dir, texts)
    assert len(set(np.round(want, 4))) == 3, "scores should differ between samples"
    # Batched with right padding (rows of different lengths) equals one-by-one in transformers.
    np.testing.assert_allclose(on_torch(PROMPTS, COMPLETIONS), want, atol=1e-5)
    np.testing.assert_allclose(on_mlx(PROMPTS, COMPLETIONS), want, atol=1e-4)
    scores = RewardScorer([on_mlx, on_torch], [1.0, -1.0]).score(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(scores.total, 0.0, atol=1e-4)


def test_a_causal_lm_is_not_a_reward_model(tiny_llama_dir):
    from cuda_ft.reward_model import load_reward_model

    with pytest.raises(ValueError, match="ForSequenceClassification"):
        load_reward(f"model:{tiny_llama_dir}", model_loader=load_reward_model)
