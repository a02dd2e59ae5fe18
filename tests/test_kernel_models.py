"""Whole models with the kernels swapped in (``--kernels triton``) against transformers' own
modules (``--kernels torch``), and ``--grad-checkpoint`` against no checkpointing.

On the CPU the Triton path runs through the interpreter (float32): the same loss, per-token
log-probs and gradient of every trainable parameter, for each patched family, padded and
padding-free, LoRA / DoRA (which falls back) / full fine-tuning (RMSNorm dW, a trained tied
head); then a few optimiser steps give the same loss curve. The ``gpu`` tier repeats the model
check in bfloat16 on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_torch_backend import sft_loss
from tiny import DOC_A, DOC_B, DOC_C, DOC_D, make_batch

from algorithms.config import ConfigError, TrainConfig
from cuda_ft.backend import TorchBackend
from cuda_ft.kernels.runtime import triton_runs_on
from cuda_ft.kernels.tolerances import tolerance

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device("cuda" if CUDA else "cpu")),
                                  reason="Triton cannot run here")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from tiny import make_tiny_model

    made = {}
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        made[family] = make_tiny_model(tmp_path_factory.mktemp(f"k_{family}"), family=family,
                                       layers=1 if family != "llama" else 2)
    made["tied"] = make_tiny_model(tmp_path_factory.mktemp("k_tied"), tie_word_embeddings=True)
    return made


def backend(model_dir, tokenizer, kernels, **overrides) -> TorchBackend:
    options = {"data": "x", "fine_tune_type": "lora", "lora_rank": 4, "lora_alpha": 8.0,
               "logprob_chunk_size": 16, "seed": 3, "dtype": "float32", "kernels": kernels}
    options.update(overrides)
    return TorchBackend(TrainConfig(**options), model_dir, tokenizer)


def nonzero_adapters(be: TorchBackend) -> TorchBackend:
    """LoRA B starts at zero, which would hide a wrong adapter term in the forward pass: give
    every B the same seeded values in both backends compared."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in sorted(be.params.items()):
            if name.endswith(".lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return be


def loss_grads_logps(be: TorchBackend, batch: dict):
    metrics = be.forward_backward(batch, sft_loss)
    grads = {k: p.grad.detach().float().cpu().clone() for k, p in be.params.items()}
    be.optimizer.zero_grad(set_to_none=True)
    return metrics["loss"], grads, be.per_token_logps(batch)


def assert_same(a, b, dtype=torch.float32):
    atol, rtol = tolerance("model", dtype)
    assert a[0] == pytest.approx(b[0], abs=atol, rel=rtol)
    assert a[1].keys() == b[1].keys()
    for name in b[1]:
        scale = b[1][name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(a[1][name] / scale, b[1][name] / scale, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    np.testing.assert_allclose(a[2], b[2], atol=atol * 10)


BATCH = make_batch([[DOC_A, DOC_B], [DOC_C, DOC_D]])


@needs_triton
@pytest.mark.parametrize("family,varlen", [("llama", True), ("llama", False), ("mistral", True),
                                           ("qwen2", False), ("qwen3", True)])
def test_patched_model_equals_unpatched(family, varlen, family_dirs, tiny_tokenizer, capsys,
                                        monkeypatch):
    if not varlen:
        monkeypatch.setenv("POSTTRAIN_TORCH_VARLEN", "0")
    patched = backend(family_dirs[family], tiny_tokenizer, "triton")
    line = capsys.readouterr().err
    assert "kernels=triton: head=triton" in line and "rmsnorm x" in line, line
    assert type(patched.hf_model.model.norm).__name__.startswith("TritonRMSNorm")
    plain = backend(family_dirs[family], tiny_tokenizer, "torch")
    assert "blocks=torch" in capsys.readouterr().err
    assert_same(loss_grads_logps(nonzero_adapters(patched), BATCH),
                loss_grads_logps(nonzero_adapters(plain), BATCH))


@needs_triton
@pytest.mark.parametrize("kind,family", [("full", "tied"), ("dora", "mistral")])
def test_patched_full_and_dora_equal_unpatched(kind, family, family_dirs, tiny_tokenizer):
    """Full fine-tuning trains the RMSNorm weights (the kernel's dW) and the tied head through
    the fused head's weight gradient; DoRA makes the fused MLP fall back to PEFT's modules."""
    patched = backend(family_dirs[family], tiny_tokenizer, "triton", fine_tune_type=kind)
    plain = backend(family_dirs[family], tiny_tokenizer, "torch", fine_tune_type=kind)
    got = loss_grads_logps(nonzero_adapters(patched), BATCH)
    want = loss_grads_logps(nonzero_adapters(plain), BATCH)
    assert_same(got, want)
    if kind == "full":
        assert want[1]["model.norm.weight"].abs().max() > 0
        assert want[1]["model.embed_tokens.weight"].abs().max() > 0


@needs_triton
def test_training_with_kernels_equals_training_without(family_dirs, tiny_tokenizer):
    curves = {}
    for kernels in ("triton", "torch"):
        be = backend(family_dirs["mistral"], tiny_tokenizer, kernels, learning_rate=1e-2)
        losses = []
        for _ in range(3):
            losses.append(be.forward_backward(BATCH, sft_loss)["loss"])
            be.optimizer_step(1e-2, 1.0)
        curves[kernels] = (losses, be.trainable_parameters())
    np.testing.assert_allclose(curves["triton"][0], curves["torch"][0], atol=1e-5)
    assert curves["torch"][0][-1] < curves["torch"][0][0]  # it trained
    # AdamW moves each weight by ~lr per step whatever the gradient's size, so float32
    # rounding in a tiny gradient can show up as ~1e-5 here: 1e-4 is 0.3% of the 3e-2 moved.
    for name, value in curves["torch"][1].items():
        np.testing.assert_allclose(curves["triton"][1][name], value, atol=1e-4, err_msg=name)


def test_unsupported_family_falls_back_with_a_notice(family_dirs, tiny_tokenizer, capsys,
                                                     monkeypatch):
    from cuda_ft import kernel_patch

    plan = kernel_patch.resolve("auto", torch.device("cpu"), "gemma")
    assert plan.blocks == "torch" and "no CUDA GPU" in plan.reason
    if triton_runs_on(torch.device("cpu")):
        be = backend(family_dirs["gemma"], tiny_tokenizer, "triton")
        line = capsys.readouterr().err
        assert "'gemma' has no Triton block patches" in line and "blocks=torch" in line, line
        assert be.per_token_logps(BATCH).shape == BATCH["input_ids"].shape


def test_kernels_triton_that_cannot_run_is_a_config_error(monkeypatch):
    from cuda_ft import kernel_patch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="--kernels=triton: .*CUDA GPU"):
        kernel_patch.resolve("triton", torch.device("cpu"), "llama")
    assert kernel_patch.resolve("auto", torch.device("cpu"), "llama").blocks == "torch"


# --- activation checkpointing ------------------------------------------------------------
@pytest.mark.parametrize("varlen,kind", [(True, "lora"), (False, "lora"), (True, "full")])
def test_grad_checkpoint_keeps_the_numbers(varlen, kind, family_dirs, tiny_tokenizer,
                                           monkeypatch):
    if not varlen:
        monkeypatch.setenv("POSTTRAIN_TORCH_VARLEN", "0")
    opts = {"fine_tune_type": kind, "lora_dropout": 0.1 if kind == "lora" else 0.0}
    ckpt = backend(family_dirs["llama"], tiny_tokenizer, "torch", grad_checkpoint=True, **opts)
    layer = ckpt.hf_model.model.layers[0]
    assert type(layer).__name__.startswith("CheckpointedBlock")
    plain = backend(family_dirs["llama"], tiny_tokenizer, "torch", **opts)
    torch.manual_seed(7)  # the same dropout masks in both (checkpointing replays the RNG)
    got = loss_grads_logps(ckpt, BATCH)
    torch.manual_seed(7)
    want = loss_grads_logps(plain, BATCH)
    assert_same(got, want)


def test_grad_checkpoint_recomputes_blocks_in_backward(family_dirs, tiny_tokenizer):
    """The point of it: each block runs twice per training step (forward, then in backward)."""
    be = backend(family_dirs["llama"], tiny_tokenizer, "torch", grad_checkpoint=True)
    calls = []
    be.hf_model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    be.forward_backward(BATCH, sft_loss)
    assert len(calls) == 2
    calls.clear()
    be.per_token_logps(BATCH)  # no grad: no checkpointing, one run
    assert len(calls) == 1


def test_grad_checkpoint_blocks_recomputes_only_the_chosen_blocks(family_dirs, tiny_tokenizer):
    from algorithms.backend import checkpointed_blocks
    from algorithms.config import TrainConfig

    be = backend(family_dirs["llama"], tiny_tokenizer, "torch", grad_checkpoint_blocks=1)
    layers = be.hf_model.model.layers
    assert [type(x).__name__.startswith("CheckpointedBlock") for x in layers] == \
        [i == 0 for i in range(len(layers))]
    calls = []
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    be.forward_backward(BATCH, sft_loss)
    assert len(calls) == len(layers) + 1
    cfg = TrainConfig(data="x", grad_checkpoint_blocks=3)
    assert checkpointed_blocks(cfg, 30) == [0, 10, 20]
    assert checkpointed_blocks(TrainConfig(data="x", grad_checkpoint=True), 4) == [0, 1, 2, 3]
    assert checkpointed_blocks(TrainConfig(data="x"), 4) == []
    with pytest.raises(ValueError, match="--grad-checkpoint-blocks 3: the model has 2"):
        checkpointed_blocks(cfg, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_patched_model_equals_unpatched_bf16_on_gpu(kind, family_dirs, tiny_tokenizer):
    got = loss_grads_logps(backend(family_dirs["qwen3"], tiny_tokenizer, "triton",
                                   fine_tune_type=kind, dtype="bfloat16"), BATCH)
    want = loss_grads_logps(backend(family_dirs["qwen3"], tiny_tokenizer, "torch",
                                    fine_tune_type=kind, dtype="bfloat16"), BATCH)
    assert_same(got, want, torch.bfloat16)
