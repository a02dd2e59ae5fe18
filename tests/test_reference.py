"""The reference policy on both backends: adapters disabled = exactly the base model; full FT =
a frozen copy of the start; --ref-model = that model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx")
pytest.importorskip("torch")

from algorithms.preference.config import ReferenceConfig
from algorithms.sft import nll_loss
from cuda_ft.backend import TorchBackend
from mlx_ft.backend import MLXBackend

BACKENDS = {"mlx": MLXBackend, "torch": TorchBackend}


RefConfig = ReferenceConfig  # a config with --ref-model (DPO's, KTO's)


def _batch(seed=0, b=2, t=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 300, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, -1] = 0
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1).astype(np.int32), "loss_mask": mask,
            "segment_ids": np.ones((b, t), np.int32), "num_items": np.float32(mask.sum())}


def _trained(cls, model_dir, tokenizer, **kw):
    be = cls(RefConfig(data="unused", dtype="float32", seed=1, **kw), model_dir, tokenizer)
    for step in range(3):
        be.forward_backward(_batch(10 + step), nll_loss)
        be.optimizer_step(5e-2, 1.0)
    return be


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_reference_is_the_starting_model(backend, kind, tiny_llama_dir, tiny_tokenizer):
    cls = BACKENDS[backend]
    batch = _batch()
    base = cls(RefConfig(data="unused", dtype="float32", fine_tune_type="full"), tiny_llama_dir,
               tiny_tokenizer).per_token_logps(batch)
    be = _trained(cls, tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind)
    policy = be.per_token_logps(batch)
    assert np.abs(policy - base).max() > 1e-3, "training should have moved the policy"
    np.testing.assert_array_equal(be.reference_per_token_logps(batch), base)
    # ...and the policy is intact after the reference pass (adapters restored).
    np.testing.assert_array_equal(be.per_token_logps(batch), policy)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_explicit_reference_model(backend, tiny_llama_dir, tiny_qwen2_dir, tiny_tokenizer):
    cls = BACKENDS[backend]
    batch = _batch(1)
    qwen = cls(RefConfig(data="unused", dtype="float32", fine_tune_type="full"), tiny_qwen2_dir,
               tiny_tokenizer).per_token_logps(batch)
    be = cls(RefConfig(data="unused", dtype="float32", ref_model=str(tiny_qwen2_dir)),
             tiny_llama_dir, tiny_tokenizer)
    np.testing.assert_array_equal(be.reference_per_token_logps(batch), qwen)
