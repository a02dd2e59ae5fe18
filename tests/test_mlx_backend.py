"""The MLX backend: chunked log-probs, document isolation, adapters, accumulation, state, export."""

from __future__ import annotations

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


def _quantised_copy(model_dir, out):
    """The tiny model quantised to 4 bits (group 32) by mlx-lm, as an MLX model dir."""
    from mlx import nn
    from mlx_lm.utils import load_model, save_config, save_model

    shutil.copytree(model_dir, out)
    model, config = load_model(out)
    nn.quantize(model, group_size=32, bits=4)
    save_model(out, model)
    save_config({**config, "quantization": {"group_size": 32, "bits": 4}}, out / "config.json")
    return out


def test_qlora_on_a_quantised_model(tiny_llama_dir, tokenizer, tmp_path):
    from mlx import nn

    quantised = _quantised_copy(tiny_llama_dir, tmp_path / "q4")

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


def test_value_head_on_a_quantised_model(tiny_llama_dir, tokenizer, tmp_path):
    """QLoRA + PPO: the value head reads the hidden size from the config (the quantised
    output weight is packed) and trains with the adapters."""
    from mlx import nn
    from test_backend_conformance import sft_and_value_loss

    from algorithms.rl.presets import PPOConfig

    quantised = _quantised_copy(tiny_llama_dir, tmp_path / "q4")
    cfg = PPOConfig(data="unused", reward=["r"], max_completion_length=8, logprob_chunk_size=7,
                    seed=3)
    be = MLXBackend(cfg, quantised, tokenizer)
    assert isinstance(be.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    batch = _batch(np.random.default_rng(9), b=2)
    values = be.forward(batch, ("values",))["values"]
    assert values.shape == (2, 12) and np.abs(values).max() > 0
    before = be.trainable_parameters()
    for _ in range(2):
        be.forward_backward(batch, sft_and_value_loss())
        be.optimizer_step(1e-2, 1.0)
    after = be.trainable_parameters()
    assert not np.array_equal(before["v_head.weight"], after["v_head.weight"])


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


@pytest.mark.parametrize("scale", [2.0, 1.7])
def test_rank_scaled_lora_is_mlx_lms_lora(scale):
    """The re-classed layer (scale on the [N, r] product) gives mlx-lm's LoRALinear's output
    and gradients: exactly for a power-of-two scale, to float rounding otherwise."""
    from mlx import nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_ft.model import RankScaledLoRA

    rng = np.random.default_rng(0)
    layer = LoRALinear.from_base(nn.Linear(24, 40), r=4, scale=scale)
    layer.linear.freeze()
    layer.lora_b = mx.array(rng.normal(size=(4, 40)).astype(np.float32))
    x = mx.array(rng.normal(size=(5, 24)).astype(np.float32))
    w = mx.array(rng.normal(size=(5, 40)).astype(np.float32))

    def run():
        value, grads = nn.value_and_grad(layer, lambda m, x: (m(x) * w).sum())(layer, x)
        return np.array(layer(x)), value.item(), dict(tree_flatten(grads))

    want = run()
    layer.__class__ = RankScaledLoRA
    got = run()
    exact = scale == 2.0
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(got[0], want[0], **tol)
    assert got[1] == pytest.approx(want[1], rel=0 if exact else 1e-5)
    assert set(got[2]) == set(want[2]) == {"lora_a", "lora_b"}
    for key in want[2]:
        np.testing.assert_allclose(np.array(got[2][key]), np.array(want[2][key]), **tol)


def test_backend_lora_layers_are_rank_scaled(tiny_llama_dir, tokenizer):
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_ft.model import RankScaledLoRA

    backend = MLXBackend(_cfg(fine_tune_type="lora", lora_rank=4), tiny_llama_dir, tokenizer)
    layers = [m for _, m in backend.model.named_modules() if isinstance(m, LoRALinear)]
    assert layers and all(type(m) is RankScaledLoRA for m in layers)
