"""MLX and torch agree: same tiny HF weights in fp32 give the same per-token log-probs.

Loss-curve parity over 10 steps is in test_train_cli.py; this file pins the forward pass, for
padded and packed batches and for adapters at init, on both model families.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx")
pytest.importorskip("torch")

from algorithms.config import TrainConfig
from algorithms.data import BatchPlan, prepare_dataset
from cuda_ft.backend import TorchBackend
from mlx_ft.backend import MLXBackend


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("parity") / "train.jsonl"
    rows = [[{"role": "user", "content": f"count to {n}"},
             {"role": "assistant", "content": " ".join(str(i) for i in range(n))}]
            for n in (2, 5, 9, 3, 7, 4)]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_per_token_logps_match(family, packing, kind, chat_file, tiny_llama_dir, tiny_qwen2_dir,
                               tiny_tokenizer):
    model = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    cfg = TrainConfig(data=str(chat_file), max_length=48, packing=packing, batch_size=3,
                      fine_tune_type=kind, logprob_chunk_size=29, dtype="float32")
    dataset = prepare_dataset(chat_file, "train", tiny_tokenizer, cfg)
    plan = BatchPlan(dataset, cfg.batch_size, cfg.max_length, packing, seed=0)
    batch = plan.collate(plan.batches(0)[0])
    if packing:
        assert batch["segment_ids"].max() > 1, "the batch should hold a packed row"
    got_mlx = MLXBackend(cfg, model, tiny_tokenizer).per_token_logps(batch)
    got_torch = TorchBackend(cfg, model, tiny_tokenizer).per_token_logps(batch)
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(got_mlx[real], got_torch[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches(tiny_llama_dir, tiny_tokenizer):
    # Same weights, same chat template, greedy decoding: the same reply on both backends.
    cfg = TrainConfig(data="unused", dtype="float32")
    mlx_reply = MLXBackend(cfg, tiny_llama_dir, tiny_tokenizer).generate("say red", 8)
    torch_reply = TorchBackend(cfg, tiny_llama_dir, tiny_tokenizer).generate("say red", 8)
    assert mlx_reply == torch_reply and len(mlx_reply) > 0


def test_transformers5_saved_rope_settings_reach_mlx(tiny_tokenizer, tmp_path):
    # transformers 5 writes rope_theta only inside "rope_parameters"; mlx-lm's llama reads the
    # flat key, so without help MLX would silently run rope_theta 10000.
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 1000.0
    cfg = TrainConfig(data="unused", dtype="float32")
    ids = np.random.default_rng(5).integers(3, 300, size=(1, 40)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((1, 40), np.float32),
             "segment_ids": np.ones((1, 40), np.int32)}
    want = TorchBackend(cfg, tmp_path, tiny_tokenizer).per_token_logps(batch)
    got = MLXBackend(cfg, tmp_path, tiny_tokenizer).per_token_logps(batch)
    np.testing.assert_allclose(got, want, atol=1e-5)
