"""Fixes the TRL comparison found, each pinned without TRL (the parity tier itself is
``test_trl_parity.py``, ``-m trl_parity``): weight decay that spares biases and norm weights,
KTO's KL rows, KTO's TRL pairing, the newline after end-of-turn, and MLX's float32 sums."""

from __future__ import annotations

import types

import numpy as np
import pytest

from algorithms.config import TrainConfig
from algorithms.data import Batch
from algorithms.data.preference import prepare_preference_dataset
from algorithms.data.preference_batching import PreferenceBatchPlan, collate_unpaired
from algorithms.weight_decay import decayed_names, is_decayed


def test_decay_spares_biases_and_norm_weights():
    exempt = ["model.norm.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.3.post_attention_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.1.pre_feedforward_layernorm.weight",
              "transformer.ln_f.RMSNorm.weight"]
    decayed = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b",
               "model.layers.0.self_attn.o_proj.weight", "model.normalizer_free.weight"]
    assert decayed_names(exempt + decayed) == decayed
    assert all(is_decayed(n, decay_all=True) for n in exempt)


def _step_with_zero_gradients(backend_name, model_dir, tokenizer, decay_all):
    """Trainable tensors before and after one AdamW step whose gradients are all 0: the Adam
    part of the update is then exactly 0 and only the decoupled decay moves a tensor."""
    cfg = TrainConfig(data="unused", dtype="float32", fine_tune_type="full", weight_decay=0.5,
                      decay_norms_and_biases=decay_all)
    if backend_name == "mlx":
        import mlx.core as mx
        from mlx.utils import tree_map

        from mlx_ft.backend import MLXBackend

        backend = MLXBackend(cfg, model_dir, tokenizer)
        backend._grads = tree_map(mx.zeros_like, backend.model.trainable_parameters())
    else:
        from cuda_ft.backend import TorchBackend

        backend = TorchBackend(cfg, model_dir, tokenizer)
    before = backend.trainable_parameters()
    backend.optimizer_step(learning_rate=0.2, max_grad_norm=1.0)
    return before, backend.trainable_parameters()


@pytest.mark.parametrize("backend_name", ["mlx", "torch"])
@pytest.mark.parametrize("decay_all", [False, True])
def test_backends_decay_weights_but_not_biases_or_norms(backend_name, decay_all, tiny_qwen2_dir,
                                                        tiny_tokenizer):
    # Regression: every tensor was decayed, so full fine-tuning drifted from TRL / transformers
    # (2.4e-4 apart by step 10 at weight decay 0.1).
    pytest.importorskip("mlx" if backend_name == "mlx" else "torch")
    before, after = _step_with_zero_gradients(backend_name, tiny_qwen2_dir, tiny_tokenizer,
                                              decay_all)
    assert any(n.endswith("q_proj.bias") for n in before)  # qwen2 has biases
    assert any("layernorm" in n for n in before)
    for name, value in before.items():
        factor = 1.0 - 0.2 * 0.5 if is_decayed(name, decay_all) else 1.0
        np.testing.assert_allclose(after[name], value * factor, rtol=1e-6, atol=0, err_msg=name)


def test_mlx_logsumexp_is_float64_accurate_on_a_large_vocabulary():
    # Regression: MLX's float32 sum over a 49k vocabulary put log-probs ~1e-4 off float64, so MLX
    # loss curves drifted 2e-4 from TRL's; the blocked sum keeps them at ~2e-6.
    mx = pytest.importorskip("mlx.core")
    from mlx_ft import precise

    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, size=(32, 49152)).astype(np.float32)
    z64 = z.astype(np.float64)
    want = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1)
    got = np.array(precise.logsumexp(mx.array(z), axis=-1))
    assert np.abs(got - want).max() < 1e-5
    odd = z[:, :1001]  # a length that is not a multiple of the block
    want_odd = np.log(np.exp(odd.astype(np.float64)).sum(1))
    np.testing.assert_allclose(np.array(precise.logsumexp(mx.array(odd))), want_odd, atol=2e-6)
    np.testing.assert_allclose(np.array(precise.blocked_sum(mx.array(z), axis=0)),
                               z64.sum(0), rtol=1e-5, atol=1e-4)
    grad = mx.grad(lambda t: precise.logsumexp(t).sum())(mx.array(odd))
    np.testing.assert_allclose(np.array(grad), np.exp(odd - want_odd[:, None]), rtol=1e-5, atol=1e-8)
    assert float(precise.logsumexp(mx.array([[-np.inf, -np.inf]]))[0]) == -np.inf


def test_mlx_grad_norm_is_float64_accurate():
    # Regression: the logged (and clipped) grad norm summed 28M squares in one float32 run,
    # 1.5e-3 off float64 on an embedding-sized gradient.
    mx = pytest.importorskip("mlx.core")
    from mlx_ft import precise

    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(8192, 576)).astype(np.float32) * 1e-3,
             rng.normal(size=(576,)).astype(np.float32)]
    want = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    got = float(precise.global_norm([mx.array(g) for g in grads]))
    assert abs(got - want) / want < 1e-6


KTO_ROWS = [
    {"prompt": "The weather is sunny.", "completion": " The quick brown fox jumps over the lazy "
     "dog.", "label": True},
    {"prompt": "Q:", "completion": " ok", "label": False},
    {"prompt": "Hello!", "completion": " Paris is the capital of France.", "label": True},
]


def _kto_dataset(write_jsonl, tok, max_length):
    cfg = types.SimpleNamespace(max_length=max_length)
    return prepare_preference_dataset(write_jsonl(KTO_ROWS), "train", tok, cfg, kind="unpaired")


def test_kto_kl_row_takes_the_whole_mismatched_completion(write_jsonl, tiny_tokenizer):
    # Regression: the KL row was built from the partner's completion AFTER that completion was cut
    # to fit its own row, so a short prompt paired with a long completion lost tokens that fit
    # (the KL estimate came out 16% low at --max-length 40); TRL cuts prompt + completion once.
    full = _kto_dataset(write_jsonl, tiny_tokenizer, 64)
    first = full.examples[0].sequence
    limit = len(first) - 3  # example 0's own row loses its last 3 completion tokens
    ds = _kto_dataset(write_jsonl, tiny_tokenizer, limit)
    assert ds.examples[0].sequence.truncated and not ds.examples[1].sequence.truncated
    arrays = collate_unpaired(ds, Batch(((0,), (1,))), offset=1)  # row 1 = prompt 1 + completion 0
    prompt1 = ds.examples[1].sequence.prompt_ids
    want = (prompt1 + first.response_ids)[:limit]
    assert len(prompt1) < len(first.prompt_ids)  # so more of completion 0 fits in the KL row
    row = arrays["kl_input_ids"][1][arrays["kl_segment_ids"][1] > 0].tolist()
    assert row == want
    assert arrays["kl_loss_mask"][1].sum() == len(want) - len(prompt1)
    assert ds.examples[0].sequence.whole_response() == (first.response_ids, first.response_mask)


def test_kto_sequential_pairing_is_trls(write_jsonl, tiny_tokenizer):
    # TRL's pairs: data-set order every epoch, prompt i with completion i - 1 in each batch.
    ds = _kto_dataset(write_jsonl, tiny_tokenizer, 64)
    plan = PreferenceBatchPlan(ds, 3, 64, seed=5, kl_pairing="sequential")
    assert plan.batches(0) == plan.batches(1) == [Batch(((0,), (1,), (2,)))]
    arrays = plan.collate(plan.batches(0)[0])
    for i in range(3):
        partner = ds.examples[(i - 1) % 3].sequence
        row = arrays["kl_input_ids"][i][arrays["kl_segment_ids"][i] > 0].tolist()
        assert row == ds.examples[i].sequence.prompt_ids + partner.response_ids
    shuffled = PreferenceBatchPlan(ds, 3, 64, seed=5)
    assert len({tuple(shuffled.batches(e)[0].indices) for e in range(6)}) > 1
    arrays = shuffled.collate(Batch(((0,), (1,), (2,))))
    row = arrays["kl_input_ids"][0][arrays["kl_segment_ids"][0] > 0].tolist()
    assert row == ds.examples[0].sequence.prompt_ids + ds.examples[1].sequence.response_ids
    with pytest.raises(ValueError, match="kl_pairing"):
        PreferenceBatchPlan(ds, 3, 64, kl_pairing="random")


@pytest.mark.parametrize("after_eot", [False, True])
def test_newline_after_end_of_turn_is_trained_only_on_request(write_jsonl, tiny_tokenizer,
                                                              after_eot):
    from algorithms.data import prepare_dataset

    rows = [{"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Hello!"}]}]
    cfg = types.SimpleNamespace(max_length=64, train_after_eot=after_eot)
    example = prepare_dataset(write_jsonl(rows), "train", tiny_tokenizer, cfg).examples[0]
    trained = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    want = "Hello!<|im_end|>" + ("\n" if after_eot else "")
    assert tiny_tokenizer.decode(trained) == want
    assert tiny_tokenizer.decode(example.input_ids).endswith("<|im_end|>\n")


def test_bias_corrected_kl_weights_the_k3_term_by_the_ratio():
    # TRL 1.16 turned on DeepSeek-V3.2's importance-weighted KL by default; ours stays
    # DeepSeekMath's plain k3 term and offers the weighted one behind --use-bias-correction-kl.
    from algorithms.ops import NumpyOps
    from algorithms.rl.policy_loss import policy_loss
    from algorithms.rl.presets import GRPOConfig

    logp = np.array([[-1.0, -2.0, -0.5]])
    batch = {"loss_mask": np.array([[1.0, 1.0, 0.0]]), "advantages": np.array([0.0]),
             "old_per_token_logps": np.array([[-1.2, -1.9, 0.0]]), "ref_per_token_logps": np.array([[-0.8, -2.5, 0.0]])}
    d = np.array([0.2, -0.5])
    k3 = np.exp(d) - d - 1
    w = np.exp(np.array([0.2, -0.1]))
    for corrected, per_token in ((False, k3), (True, k3 * w)):
        cfg = GRPOConfig(data="x", beta=0.1, use_bias_correction_kl=corrected)
        loss, metrics = policy_loss(NumpyOps(), logp, batch, cfg)
        assert metrics["kl"] == pytest.approx(per_token.mean(), rel=1e-12)
        assert loss == pytest.approx(0.1 * per_token.mean(), rel=1e-12)  # A = 0: KL only


def test_torch_grad_norm_is_float64_accurate_on_a_large_vocabulary(tmp_path, tiny_tokenizer):
    # TRL logs (and clips by) torch.nn.utils.clip_grad_norm_'s float32 norm, ~2e-5 off float64
    # once the lm_head gradient has 49k x 64 entries; ours sums squares with torch's cascade sum
    # and stays at ~1e-7, so on large vocabularies our grad_norm is the accurate one of the two.
    torch = pytest.importorskip("torch")
    from tiny import make_tiny_model

    from cuda_ft.backend import TorchBackend

    model = make_tiny_model(tmp_path / "big_vocab", vocab_size=49152)
    backend = TorchBackend(TrainConfig(data="x", dtype="float32", fine_tune_type="full"), model,
                           tiny_tokenizer)
    gen = torch.Generator().manual_seed(0)
    for p in backend.params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    want = float(np.sqrt(sum((p.grad.double() ** 2).sum().item() for p in backend.params.values())))
    got = backend.optimizer_step(learning_rate=0.0, max_grad_norm=0.0)
    assert abs(got - want) / want < 1e-6
