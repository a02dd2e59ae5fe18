"""cuda_ft.TorchBackend on the tiny models, on the CPU in float32.

Each test pins one promise of the Backend protocol: chunked log-probs equal full-logit ones,
packed documents are isolated, adapters start at the base model, every trainable group gets a
gradient, grad accumulation and resume are equivalences, and saved artefacts load in PEFT /
transformers with the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tiny import DOC_A, DOC_B, DOC_D, make_batch

from algorithms.config import TrainConfig
from algorithms.ops import NumpyOps
from cuda_ft.backend import TorchBackend
from cuda_ft.logprobs import chunked_token_logps, reference_token_logps
from cuda_ft.ops import TorchOps


def sft_loss(ops, per_token_logps, batch):
    """sum(-logp * mask) / num_items: the SFT token mean over the accumulated step."""
    loss = ops.sum(-per_token_logps * batch["loss_mask"]) / batch["num_items"]
    return loss, {"tokens": ops.sum(batch["loss_mask"])}


def make_backend(model_dir, tokenizer, **overrides) -> TorchBackend:
    options = {"data": "x", "fine_tune_type": "lora", "lora_rank": 4, "lora_alpha": 8.0,
               "logprob_chunk_size": 7, "learning_rate": 1e-2, "seed": 3, "dtype": "float32"}
    options.update(overrides)
    return TorchBackend(TrainConfig(**options), model_dir, tokenizer)


def train_steps(backend: TorchBackend, batch: dict, steps: int, lr: float = 1e-2) -> None:
    for _ in range(steps):
        backend.forward_backward(batch, sft_loss)
        backend.optimizer_step(lr, 1.0)


def plain_logps(model_dir, ids: list[int]) -> np.ndarray:
    """log_softmax(model(ids).logits) at the next token: no backend code involved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_logps_equal_reference_with_gradients(chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(0.25 * torch.randn(50, 16, generator=gen))
    targets = torch.randint(0, 50, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)  # a non-uniform upstream gradient

    got = chunked_token_logps(hidden, lm_head, targets, chunk_size)
    grads = torch.autograd.grad((got * weights).sum(), [hidden, lm_head.weight])
    want = reference_token_logps(lm_head(hidden), targets)
    want_grads = torch.autograd.grad((want * weights).sum(), [hidden, lm_head.weight])

    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_chunked_logps_never_keep_full_logits_for_backward():
    """Regression: without the checkpoint, every chunk's [chunk, V] logits stay saved for backward."""
    hidden = torch.randn(2, 16, 8, requires_grad=True)
    lm_head = torch.nn.Linear(8, 500, bias=False)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = chunked_token_logps(hidden, lm_head, torch.zeros(2, 16, dtype=torch.long), 4)
    assert sum(saved) < 2 * 16 * 500 // 4, saved  # far less than the [B*T, V] logits
    logps.sum().backward()
    assert hidden.grad is not None and lm_head.weight.grad.abs().sum() > 0


def test_torch_ops_match_numpy_reference():
    t, n = TorchOps(), NumpyOps()
    x = np.array([-3.0, -0.5, 0.0, 0.7, 4.0], np.float32)
    y = np.array([1.0, -1.0, 0.5, 0.5, 5.0], np.float32)
    tx, ty = t.asarray(x), t.asarray(y)
    pairs = [
        (t.exp(tx), n.exp(x)), (t.log(t.abs(tx) + 1), n.log(n.abs(x) + 1)),
        (t.log_sigmoid(tx), n.log_sigmoid(x)), (t.sigmoid(tx), n.sigmoid(x)),
        (t.square(tx), n.square(x)), (t.maximum(tx, ty), n.maximum(x, y)),
        (t.minimum(tx, 0.1), n.minimum(x, 0.1)), (t.clip(tx, -1.0, None), n.clip(x, -1.0, None)),
        (t.where(tx > 0, tx, ty), n.where(x > 0, x, y)),
        (t.sum(tx), n.sum(x)), (t.mean(tx.reshape(1, 5), axis=1), n.mean(x.reshape(1, 5), axis=1)),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    leaf = torch.tensor([2.0], requires_grad=True)
    assert not t.stop_gradient(leaf * 3).requires_grad
    assert t.to_float(leaf * 3) == 6.0


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
def test_device_choice_is_explained():
    from cuda_ft.device import choose_device

    with pytest.raises(ValueError, match="--dtype='fp8'"):
        choose_device("fp8", announce=False)
    if torch.cuda.is_available():
        pytest.skip("the CPU wording is checked on machines without a GPU")
    assert choose_device("auto", announce=False).line() == (
        "cuda_ft: device=cpu dtype=float32 (no CUDA GPU found)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_bfloat16_on_gpu_trains_and_isolates_documents(kind, tiny_llama_dir, tiny_tokenizer,
                                                       tmp_path):
    """dtype=auto on a GPU: bf16 compute, fp32 trainable weights, same numbers within bf16 noise."""
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]], length=16)
    fp32 = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind)
    bf16 = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind, dtype="auto")
    assert bf16.choice.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.params.values())
    want, got = fp32.per_token_logps(batch), bf16.per_token_logps(batch)
    np.testing.assert_allclose(got, want, atol=0.05)
    alone = bf16.per_token_logps(make_batch([[DOC_B]]))
    a, b = len(DOC_A), len(DOC_B)
    np.testing.assert_allclose(got[0, a:a + b - 1], alone[0, :b - 1], atol=0.05)
    losses = []
    for _ in range(3):
        losses.append(bf16.forward_backward(batch, sft_loss)["loss"])
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in bf16.params.items()
                   if not n.endswith("lora_A") or len(losses) > 1)
        bf16.optimizer_step(1e-2, 1.0)
    assert losses[-1] < losses[0]
    bf16.save_state(str(tmp_path / "state"))
    bf16.load_state(str(tmp_path / "state"))
    assert isinstance(bf16.generate("Hi", 4), str)
    assert bf16.peak_memory_bytes() > 0
