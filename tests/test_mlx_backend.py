"""The MLX backend: chunked log-probs, document isolation, adapters, accumulation, state, export."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlx")
import mlx_ft  # noqa: F401  (loads OpenBLAS before mlx.core)

mx = pytest.importorskip("mlx.core")

from algorithms.config import TrainConfig
from algorithms.sft import nll_loss
from mlx_ft.backend import MLXBackend
from mlx_ft.logprobs import chunked_token_logps, reference_token_logps


def _cfg(**kw) -> TrainConfig:
    base = {"data": "unused", "logprob_chunk_size": 7, "seed": 3}
    return TrainConfig(**{**base, **kw})


def _batch(rng, b=2, t=12, vocab=300, segments=None) -> dict:
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32) if segments is None else np.asarray(segments, np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=1).astype(np.int32),
            "loss_mask": mask, "segment_ids": seg, "num_items": np.float32(mask.sum())}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def test_chunked_logps_match_full_logits_with_gradients(tiny_llama_dir, tokenizer):
    be = MLXBackend(_cfg(fine_tune_type="full"), tiny_llama_dir, tokenizer)
    batch = _batch(np.random.default_rng(0))
    ids, tgt = mx.array(batch["input_ids"]), mx.array(batch["targets"])
    h = be.model.model(ids)

    def reference(hidden):
        return reference_token_logps(be.model.lm_head(hidden), tgt).sum()

    want, want_grad = mx.value_and_grad(reference)(h)
    for chunk in (1, 7, 1000):
        got = chunked_token_logps(be.model, h, tgt, chunk)
        np.testing.assert_allclose(np.array(got).sum(), want.item(), rtol=1e-6)
        np.testing.assert_allclose(
            np.array(got), np.array(reference_token_logps(be.model.lm_head(h), tgt)), atol=1e-5)
        grad = mx.grad(lambda hidden, c=chunk: chunked_token_logps(be.model, hidden, tgt, c).sum())(h)
        np.testing.assert_allclose(np.array(grad), np.array(want_grad), atol=1e-6)


def test_packed_documents_are_isolated(tiny_llama_dir, tokenizer):
    # A packed row [doc1 (5 tokens) | doc2 (7 tokens)]: doc2's log-probs equal doc2 run alone.
    be = MLXBackend(_cfg(), tiny_llama_dir, tokenizer)
    batch = _batch(np.random.default_rng(1), b=1, segments=[[1] * 5 + [2] * 7])
    packed = be.per_token_logps(batch)
    alone = {k: (v[:, 5:] if getattr(v, "ndim", 0) == 2 else v) for k, v in batch.items()}
    alone["segment_ids"] = np.ones((1, 7), np.int32)
    np.testing.assert_allclose(packed[:, 5:], be.per_token_logps(alone), atol=1e-5)
    # ...and without the block mask doc2 would see doc1: the test can fail.
    causal = dict(batch, segment_ids=np.ones((1, 12), np.int32))
    assert np.abs(be.per_token_logps(causal)[:, 5:] - be.per_token_logps(alone)).max() > 1e-4


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_start_at_the_base_model(tiny_llama_dir, tokenizer, kind):
    batch = _batch(np.random.default_rng(2))
    base = MLXBackend(_cfg(fine_tune_type="full"), tiny_llama_dir, tokenizer)
    adapted = MLXBackend(_cfg(fine_tune_type=kind), tiny_llama_dir, tokenizer)
    np.testing.assert_allclose(adapted.per_token_logps(batch), base.per_token_logps(batch), atol=1e-6)
    from algorithms.backend import lora_a_init

    a = adapted.trainable_parameters()["model.layers.1.mlp.down_proj.lora_A"]
    np.testing.assert_array_equal(a, lora_a_init(3, "model.layers.1.mlp.down_proj", 128, 8))


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_every_trainable_group_gets_a_gradient(tiny_llama_dir, tokenizer, kind):
    be = MLXBackend(_cfg(fine_tune_type=kind, learning_rate=1e-2), tiny_llama_dir, tokenizer)
    rng = np.random.default_rng(4)
    before = be.trainable_parameters()
    # Step 1 moves lora_B (lora_A's gradient is exactly zero while B == 0); step 2 moves lora_A.
    for _ in range(2):
        be.forward_backward(_batch(rng), nll_loss)
        assert be.optimizer_step(1e-2, 0.0) > 0
    after = be.trainable_parameters()
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert not unchanged, f"no gradient reached {unchanged[:5]}"
    groups = {k.rsplit(".", 1)[-1] for k in after}
    expected = {"lora": {"lora_A", "lora_B"}, "dora": {"lora_A", "lora_B", "magnitude"}}
    if kind != "full":
        assert groups == expected[kind]


def test_grad_accumulation_equals_big_batch(tiny_llama_dir, tokenizer):
    big = _batch(np.random.default_rng(5), b=4)
    one = MLXBackend(_cfg(), tiny_llama_dir, tokenizer)
    four = MLXBackend(_cfg(), tiny_llama_dir, tokenizer)
    for _ in range(2):
        one.forward_backward(big, nll_loss)
        one.optimizer_step(1e-2, 1.0)
        for i in range(4):
            micro = {k: (v[i:i + 1] if getattr(v, "ndim", 0) == 2 else v) for k, v in big.items()}
            four.forward_backward(micro, nll_loss)  # num_items stays the whole step's count
        four.optimizer_step(1e-2, 1.0)
    a, b = one.trainable_parameters(), four.trainable_parameters()
    # Adam divides by sqrt(v): where a gradient is ~0, float rounding of the summed micro-batch
    # gradients moves the update by ~1e-6 of a 1e-2 step; a wrong denominator moves it by ~lr.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_state_round_trip(tiny_llama_dir, tokenizer, tmp_path):
    rng = np.random.default_rng(6)
    batches = [_batch(rng) for _ in range(4)]
    cfg = _cfg(lora_dropout=0.1)
    straight = MLXBackend(cfg, tiny_llama_dir, tokenizer)
    for i, b in enumerate(batches):
        straight.forward_backward(b, nll_loss)
        straight.optimizer_step(1e-2, 1.0)
        if i == 1:
            straight.save_state(str(tmp_path))
    resumed = MLXBackend(copy.deepcopy(cfg), tiny_llama_dir, tokenizer)
    resumed.load_state(str(tmp_path))
    for b in batches[2:]:
        resumed.forward_backward(b, nll_loss)
        resumed.optimizer_step(1e-2, 1.0)
    a, b = straight.trainable_parameters(), resumed.trainable_parameters()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_saved_adapters_load_in_mlx_lm(tiny_llama_dir, tokenizer, tmp_path, kind):
    from mlx_lm.utils import load

    be = MLXBackend(_cfg(fine_tune_type=kind), tiny_llama_dir, tokenizer)
    rng = np.random.default_rng(7)
    for _ in range(2):
        be.forward_backward(_batch(rng), nll_loss)
        be.optimizer_step(1e-2, 1.0)
    be.save_adapters(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fine_tune_type"] == kind
    model, _ = load(str(tiny_llama_dir), adapter_path=str(tmp_path))
    ids = mx.array(_batch(rng)["input_ids"])
    be.model.eval()
    np.testing.assert_allclose(np.array(model(ids)), np.array(be.model(ids)), atol=1e-5)


def test_qlora_on_a_quantised_model(tiny_llama_dir, tokenizer, tmp_path):
    from mlx import nn
    from mlx_lm.utils import load_model, save_config, save_model

    quantised = tmp_path / "q4"
    shutil.copytree(tiny_llama_dir, quantised)
    model, config = load_model(quantised)
    nn.quantize(model, group_size=32, bits=4)
    save_model(quantised, model)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, quantised / "config.json")

    be = MLXBackend(_cfg(), quantised, tokenizer)
    assert isinstance(be.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    before = be.trainable_parameters()
    rng = np.random.default_rng(8)
    losses = []
    for _ in range(3):
        losses.append(be.forward_backward(_batch(rng, b=1) | {}, nll_loss)["loss"])
        be.optimizer_step(1e-2, 1.0)
    after = be.trainable_parameters()
    assert all(not np.array_equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    assert set(after) == set(before) and all(k.endswith(("lora_A", "lora_B")) for k in after)


def test_openblas_is_loaded_before_mlx_when_present():
    import os
    import subprocess
    import sys

    from mlx_ft import blas

    probe = "import mlx_ft.blas as b, mlx.core; print(b.loaded_from)"
    if not any(os.path.exists(p.format(arch=os.uname().machine)) for p in blas.CANDIDATES):
        pytest.skip("no system OpenBLAS here (apt-get install libopenblas0-pthread)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "libopenblas" in out.stdout
    env = {**os.environ, "POSTTRAIN_NO_OPENBLAS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "None"
