"""The tiny fixtures themselves: deterministic files, a working chat template and offsets."""

from __future__ import annotations

import json

from tiny import make_tiny_model, make_tiny_tokenizer


def test_tokenizer_is_byte_identical_across_builds(tmp_path):
    a = make_tiny_tokenizer(tmp_path / "a")
    b = make_tiny_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_special_tokens_and_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 384
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    text = "hello world"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1][1] == len(text)


def test_model_config_points_at_tokenizer_ids(tmp_path):
    d = make_tiny_model(tmp_path / "m", family="qwen2", tie_word_embeddings=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == 384
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 0


def test_tiny_models_load_in_transformers_and_mlx_with_equal_logits(tiny_llama_dir, tiny_qwen2_dir):
    """Both loaders read the same files; fp32 logits agree within 1e-4."""
    import numpy as np
    import pytest

    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from transformers import AutoModelForCausalLM

    ids = [[5, 17, 100, 200, 3, 44, 255, 300, 1, 2, 7, 9]]
    for d in (tiny_llama_dir, tiny_qwen2_dir):
        hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        with torch.no_grad():
            hf_logits = hf(torch.tensor(ids)).logits.numpy()
        model, _ = mlx_lm.load(str(d))
        mlx_logits = np.array(model(mx.array(ids)).astype(mx.float32))
        assert hf_logits.shape == (1, 12, 384)
        assert np.abs(hf_logits - mlx_logits).max() < 1e-4
        assert np.abs(hf_logits).max() > 0.1  # not a degenerate all-zero model
