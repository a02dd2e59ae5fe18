"""``--grad-checkpoint`` on the MLX backend: same loss, gradients and log-probs as without
(padded, packed and padding-free forwards; LoRA with dropout, whose masks must be redrawn
identically), and the blocks really are recomputed in the backward pass."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx")

from mlx.utils import tree_flatten
from test_backend_conformance import grads
from test_torch_backend import sft_loss
from tiny import DOC_A, DOC_B, DOC_C, DOC_D, make_batch

from algorithms.backend import attention_allowed
from algorithms.config import TrainConfig


def run(model_dir, tokenizer, batch, **overrides):
    from mlx_ft.backend import MLXBackend

    options = {"data": "x", "fine_tune_type": "lora", "lora_rank": 4, "lora_alpha": 8.0,
               "logprob_chunk_size": 16, "seed": 3, "dtype": "float32"}
    options.update(overrides)
    be = MLXBackend(TrainConfig(**options), model_dir, tokenizer)
    losses = []
    for _ in range(2):  # two steps: the second starts from the RNG state the first left
        losses.append(be.forward_backward(batch, sft_loss)["loss"])
        grads = {k: np.array(v) for k, v in tree_flatten(be._grads)}
        be.optimizer_step(1e-2, 1.0)
    return be, losses, grads, be.per_token_logps(batch)


@pytest.mark.parametrize("path,kind,dropout", [("varlen", "lora", 0.2), ("padded", "lora", 0.0),
                                               ("packed", "full", 0.0)])
def test_grad_checkpoint_keeps_the_numbers(path, kind, dropout, tiny_llama_dir, tiny_tokenizer,
                                           monkeypatch):
    if path != "varlen":
        monkeypatch.setenv("POSTTRAIN_MLX_VARLEN", "0")
    rows = [[DOC_A, DOC_B], [DOC_C, DOC_D]] if path != "padded" else [[DOC_A], [DOC_B]]
    batch = make_batch(rows)
    if path == "packed":
        assert attention_allowed(batch["segment_ids"]) is not None
    opts = {"fine_tune_type": kind, "lora_dropout": dropout}
    be, *got = run(tiny_llama_dir, tiny_tokenizer, batch, grad_checkpoint=True, **opts)
    assert type(be.model.layers[0]).__name__.startswith("Checkpointed")
    _, *want = run(tiny_llama_dir, tiny_tokenizer, batch, **opts)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        scale = np.abs(want[1][name]).max() + 1e-12
        np.testing.assert_allclose(got[1][name] / scale, want[1][name] / scale, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)


def test_grad_checkpoint_recomputes_blocks(tiny_llama_dir, tiny_tokenizer, monkeypatch):
    from mlx_ft import varlen

    calls = []
    block = varlen._block
    monkeypatch.setattr(varlen, "_block", lambda *a: calls.append(1) or block(*a))
    batch = make_batch([[DOC_A, DOC_B], [DOC_C]])
    for checkpointed, runs_per_layer in ((False, 1), (True, 2)):
        from mlx_ft.backend import MLXBackend

        be = MLXBackend(TrainConfig(data="x", dtype="float32", lora_rank=4,
                                    grad_checkpoint=checkpointed), tiny_llama_dir, tiny_tokenizer)
        calls.clear()
        be.forward_backward(batch, sft_loss)
        assert len(calls) == runs_per_layer * len(be.model.layers)


def test_only_the_chosen_blocks_are_recomputed(tiny_llama_dir, tiny_tokenizer, monkeypatch):
    """--grad-checkpoint-blocks 1: one block runs twice, the others once; same numbers."""
    from mlx_ft import varlen
    from mlx_ft.backend import MLXBackend
    from mlx_ft.grad_checkpoint import _CheckpointedCall

    calls = []
    block = varlen._block
    monkeypatch.setattr(varlen, "_block", lambda *a: calls.append(1) or block(*a))
    batch = make_batch([[DOC_A, DOC_B], [DOC_C]])
    results = []
    for blocks in (0, 1):
        be = MLXBackend(TrainConfig(data="x", dtype="float32", lora_rank=4, fine_tune_type="full",
                                    grad_checkpoint_blocks=blocks), tiny_llama_dir,
                        tiny_tokenizer)
        layers = len(be.model.layers)
        assert layers > 1
        calls.clear()
        results.append((be.forward_backward(batch, sft_loss)["loss"], grads(be)))
        assert len(calls) == layers + blocks
        assert [isinstance(x, _CheckpointedCall) for x in be.model.layers] == \
            [i == 0 and blocks == 1 for i in range(layers)]
    (loss_plain, g_plain), (loss_ckpt, g_ckpt) = results
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for key, want in g_plain.items():
        np.testing.assert_allclose(g_ckpt[key], want, rtol=1e-5, atol=1e-7, err_msg=key)
