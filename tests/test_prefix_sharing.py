"""Shared prefixes (algorithms.data.prefix_tree): the tree layout reproduces every document, and
on both backends the shared forward gives the loss, log-probs and gradients of the plain one."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import make_batch

from algorithms.data.batching import document_spans
from algorithms.data.prefix_tree import plan

PROMPT = [5, 17, 100, 200, 3, 44, 255, 9, 31, 32]
OTHER = [300, 1, 2, 7, 9, 120, 64, 33, 12]


def _grpo_like_rows() -> list[list[list[int]]]:
    """Two prompts, three completions each (one a prefix of another), a lone document and a
    packed row: what a GRPO micro-batch and a DPO pair look like, and the edge cases."""
    return [[PROMPT + [7, 8, 9]], [PROMPT + [7, 8, 9, 10, 11]], [PROMPT + [60, 61]],
            [OTHER + [4, 4, 4, 4]], [OTHER + [5]], [[250, 251, 40]],
            [[11, 12, 13], PROMPT + [70]]]


def test_tree_layout_gathers_back_every_token_and_position():
    batch = make_batch(_grpo_like_rows())
    spans = document_spans(batch["segment_ids"])
    tokens = np.concatenate([batch["input_ids"][r, s:s + n] for r, s, n in spans])
    positions = np.concatenate([np.arange(s, s + n) for _, s, n in spans])
    for min_shared in (1, 4, 10, 11, 100):
        tree = plan(batch["input_ids"], batch["segment_ids"], min_shared)
        np.testing.assert_array_equal(tree.input_ids[tree.gather], tokens)
        np.testing.assert_array_equal(tree.positions[tree.gather], positions)
        for i, node in enumerate(tree.nodes):  # children follow their parents, contiguously
            if node.parent >= 0:
                parent = tree.nodes[node.parent]
                assert node.parent < i and node.start == parent.start + parent.length
    shared = plan(batch["input_ids"], batch["segment_ids"], 4)
    # PROMPT once for its 3 rows (not for the packed row: other positions), + [7, 8, 9] once
    # for the 2 rows that continue alike, OTHER once for 2
    assert len(shared.input_ids) == len(tokens) - 2 * len(PROMPT) - 3 - len(OTHER)
    two = make_batch([[PROMPT + [1]], [PROMPT + [2, 3]]])
    assert not plan(two["input_ids"], two["segment_ids"], 11).shared  # 10 shared < 11
    assert len(plan(two["input_ids"], two["segment_ids"], 10).input_ids) == 10 + 1 + 2


def _backend(name, tiny_llama_dir, tiny_tokenizer):
    from algorithms.config import TrainConfig

    cfg = TrainConfig(data="unused", dtype="float32", logprob_chunk_size=16)
    if name == "mlx":
        from mlx_ft.backend import MLXBackend

        return MLXBackend(cfg, tiny_llama_dir, tiny_tokenizer)
    from cuda_ft.backend import TorchBackend

    return TorchBackend(cfg, tiny_llama_dir, tiny_tokenizer)


def _grads(name, backend) -> dict[str, np.ndarray]:
    if name == "mlx":
        from mlx.utils import tree_flatten

        return {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    return {k: p.grad.numpy().copy() for k, p in backend.params.items()}


def _run(name, tiny_llama_dir, tiny_tokenizer, batch):
    from algorithms.backend import Loss

    def loss(ops, outputs, b):  # a loss reading log-probs and entropy, as GRPO's does
        logps, entropy = outputs["logps"], outputs["entropy"]
        value = ops.sum((logps * 0.7 - 0.01 * entropy) * b["loss_mask"]) / b["num_items"]
        return -value, {"entropy": ops.sum(entropy * b["loss_mask"]) / b["num_items"]}

    backend = _backend(name, tiny_llama_dir, tiny_tokenizer)
    metrics = backend.forward_backward(batch, Loss(loss, {"logps": True, "entropy": False}))
    return metrics, _grads(name, backend), backend.forward(batch, ("logps", "entropy"))


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_shared_prefix_forward_backward_equals_the_plain_one(name, monkeypatch, tiny_llama_dir,
                                                             tiny_tokenizer):
    pytest.importorskip("mlx" if name == "mlx" else "torch")
    switch = {"mlx": "POSTTRAIN_MLX_SHARED_PREFIX", "torch": "POSTTRAIN_TORCH_SHARED_PREFIX"}
    batch = make_batch(_grpo_like_rows())
    monkeypatch.setenv(switch[name], "4")
    shared = _run(name, tiny_llama_dir, tiny_tokenizer, batch)
    monkeypatch.setenv(switch[name], "0")
    plain = _run(name, tiny_llama_dir, tiny_tokenizer, batch)
    for key in plain[0]:
        assert shared[0][key] == pytest.approx(plain[0][key], rel=1e-5, abs=1e-6), key
    assert shared[1].keys() == plain[1].keys()
    for key in plain[1]:
        scale = np.abs(plain[1][key]).max() + 1e-12
        np.testing.assert_allclose(shared[1][key] / scale, plain[1][key] / scale, atol=2e-5,
                                   err_msg=key)
    real = batch["segment_ids"] > 0
    for key in ("logps", "entropy"):
        np.testing.assert_allclose(shared[2][key][real], plain[2][key][real], atol=2e-5)
