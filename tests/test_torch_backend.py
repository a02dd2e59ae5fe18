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

from algorithms.backend import lora_a_init
from algorithms.config import TrainConfig
from algorithms.ops import NumpyOps
from cuda_ft.backend import TorchBackend
from cuda_ft.logprobs import chunked_token_logps, reference_token_logps
from cuda_ft.ops import TorchOps

PAD = 0
DOC_A = [5, 17, 100, 200, 3, 44, 255]
DOC_B = [300, 1, 2, 7, 9, 120, 64, 33]
DOC_C = [11, 12, 13, 14]
DOC_D = [250, 251, 40, 41, 42, 43, 90, 91, 92]


def sft_loss(ops, per_token_logps, batch):
    """sum(-logp * mask) / num_items: the SFT token mean over the accumulated step."""
    loss = ops.sum(-per_token_logps * batch["loss_mask"]) / batch["num_items"]
    return loss, {"tokens": ops.sum(batch["loss_mask"])}


def make_batch(rows: list[list[list[int]]], length: int | None = None) -> dict[str, np.ndarray]:
    """Rows of documents -> the [B, T] layout of algorithms.backend (right padding, 1-based ids)."""
    length = length or max(sum(len(d) for d in row) for row in rows)
    shape = (len(rows), length)
    batch = {"input_ids": np.full(shape, PAD, np.int32), "targets": np.full(shape, PAD, np.int32),
             "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32)}
    for b, row in enumerate(rows):
        start = 0
        for seg, doc in enumerate(row, start=1):
            end = start + len(doc)
            batch["input_ids"][b, start:end] = doc
            batch["targets"][b, start:end - 1] = doc[1:]
            batch["loss_mask"][b, start:end - 1] = 1.0
            batch["segment_ids"][b, start:end] = seg
            start = end
    batch["num_items"] = np.float32(batch["loss_mask"].sum())
    return batch


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
def test_per_token_logps_equal_plain_model(tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type="full")
    got = backend.per_token_logps(make_batch([[DOC_B]]))
    np.testing.assert_allclose(got[0, :-1], plain_logps(tiny_llama_dir, DOC_B), atol=1e-5)

    # right padding: the short row's real positions are those of the row run alone
    padded = backend.per_token_logps(make_batch([[DOC_B], [DOC_A]]))
    np.testing.assert_allclose(padded[1, :len(DOC_A) - 1], plain_logps(tiny_llama_dir, DOC_A),
                               atol=1e-5)
    np.testing.assert_allclose(padded[0, :-1], got[0, :-1], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_documents_are_isolated(family, tiny_llama_dir, tiny_qwen2_dir, tiny_tokenizer):
    """Pins the 4D block mask: document 2 of a packed row sees nothing of document 1."""
    model_dir = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    backend = make_backend(model_dir, tiny_tokenizer, fine_tune_type="full")
    packed = make_batch([[DOC_A, DOC_B], [DOC_C, DOC_D, DOC_A]], length=24)
    got = backend.per_token_logps(packed)
    alone = backend.per_token_logps(make_batch([[DOC_B], [DOC_D], [DOC_A]]))
    a, b, c, d = len(DOC_A), len(DOC_B), len(DOC_C), len(DOC_D)
    np.testing.assert_allclose(got[0, a:a + b - 1], alone[0, :b - 1], atol=1e-5)
    np.testing.assert_allclose(got[1, c:c + d - 1], alone[1, :d - 1], atol=1e-5)
    np.testing.assert_allclose(got[1, c + d:c + d + a - 1], alone[2, :a - 1], atol=1e-5)
    # the same row without the mask leaks document 1 into document 2 (so the check above can fail)
    causal = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    leaked = backend.per_token_logps(causal)
    assert np.abs(leaked[0, a:a + b - 1] - alone[0, :b - 1]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_start_at_base_model_with_shared_init(kind, tiny_llama_dir, tiny_tokenizer):
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    base = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type="full").per_token_logps(batch)
    backend = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind)
    got = backend.per_token_logps(batch)
    if kind == "lora":
        np.testing.assert_array_equal(got, base)  # B = 0 adds exactly zero
    else:
        np.testing.assert_allclose(got, base, atol=1e-6)  # magnitude / ||W|| rounds to ~1

    params = backend.trainable_parameters()
    linears = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    paths = [f"model.layers.{i}.{name}" for i in range(2) for name in linears]
    suffixes = ["lora_A", "lora_B"] + (["magnitude"] if kind == "dora" else [])
    assert sorted(params) == sorted(f"{p}.{s}" for p in paths for s in suffixes)
    for path in paths:
        a = params[f"{path}.lora_A"]
        np.testing.assert_array_equal(a, lora_a_init(3, path, a.shape[1], 4))
        assert not params[f"{path}.lora_B"].any()
        assert params[f"{path}.lora_B"].shape[1] == 4


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_every_trainable_group_gets_a_gradient(kind, tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind)
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    backend.forward_backward(batch, sft_loss)
    step0 = {k: p.grad.abs().sum().item() for k, p in backend.params.items()}
    if kind == "full":
        assert all(v > 0 for v in step0.values()), [k for k, v in step0.items() if v == 0]
        return
    # At step 0 B = 0, so dL/dA = B^T (...) is exactly zero: check B (and the DoRA magnitude)
    # now, and A after one optimizer step has made B non-zero.
    for name, value in step0.items():
        assert (value == 0) if name.endswith("lora_A") else (value > 0), name
    backend.optimizer_step(1e-2, 1.0)
    backend.forward_backward(batch, sft_loss)
    zero = [k for k, p in backend.params.items() if p.grad.abs().sum().item() == 0]
    assert not zero


def test_grad_accumulation_equals_one_big_batch(tiny_llama_dir, tiny_tokenizer):
    """4 micro-batches of 1 with num_items = all loss tokens == 1 batch of 4: grads, then weights.

    adam_epsilon is raised to 1e-4 for the weight check: Adam's first step is ~lr * sign(g), so
    with eps = 1e-8 a gradient entry near 1e-8 turns fp32 summation-order noise into 1e-5 weight
    differences, which would test the rounding, not the accumulation.
    """
    rows = [[DOC_A], [DOC_B, DOC_C], [DOC_D], [DOC_C, DOC_A]]
    full = make_batch(rows, length=16)
    big = make_backend(tiny_llama_dir, tiny_tokenizer, adam_epsilon=1e-4)
    big.forward_backward(full, sft_loss)
    big_grads = {k: p.grad.clone() for k, p in big.params.items()}
    norm_big = big.optimizer_step(1e-2, 0.5)

    small = make_backend(tiny_llama_dir, tiny_tokenizer, adam_epsilon=1e-4)
    for i in range(4):
        micro = {k: v[i:i + 1] for k, v in full.items() if k != "num_items"}
        micro["num_items"] = full["num_items"]  # the token count of the whole accumulated step
        small.forward_backward(micro, sft_loss)
    for name, grad in big_grads.items():  # fp32 summation order differs: 1e-5 of the largest
        scale = grad.abs().max().item()
        torch.testing.assert_close(small.params[name].grad, grad, rtol=0, atol=1e-5 * scale)
    norm_small = small.optimizer_step(1e-2, 0.5)

    assert norm_big == pytest.approx(norm_small, rel=1e-5) and norm_big > 0.5  # clipping ran
    want, got = big.trainable_parameters(), small.trainable_parameters()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_resume_equals_uninterrupted_training(tiny_llama_dir, tiny_tokenizer, tmp_path):
    """Dropout on, so the restored RNG state matters too."""
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    first = make_backend(tiny_llama_dir, tiny_tokenizer, lora_dropout=0.1, weight_decay=0.01)
    train_steps(first, batch, 2)
    first.save_state(str(tmp_path / "ckpt"))
    train_steps(first, batch, 2)

    resumed = make_backend(tiny_llama_dir, tiny_tokenizer, lora_dropout=0.1, weight_decay=0.01)
    resumed.load_state(str(tmp_path / "ckpt"))
    train_steps(resumed, batch, 2)
    want, got = first.trainable_parameters(), resumed.trainable_parameters()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
def _backend_logits(backend: TorchBackend, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backend.model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_saved_adapters_load_in_peft_and_transformers(kind, tiny_llama_dir, tiny_tokenizer,
                                                      tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend = make_backend(tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind)
    train_steps(backend, make_batch([[DOC_A, DOC_B], [DOC_D]]), 2)  # B, magnitude away from init
    out = tmp_path / kind
    backend.save_adapters(str(out))
    if kind == "full":
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert (out / "tokenizer.json").exists()
    else:
        assert (out / "adapter_model.safetensors").exists()
        assert (out / "adapter_config.json").exists()
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([DOC_A + DOC_B])
    with torch.no_grad():
        want = loaded.eval()(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))(input_ids=ids).logits
    got = _backend_logits(backend, ids)
    torch.testing.assert_close(want, got, rtol=0, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-4  # the training is in the artefact


def test_generate_is_greedy_and_returns_text(tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(tiny_llama_dir, tiny_tokenizer)
    first = backend.generate("What is two plus two?", 8)
    assert isinstance(first, str) and len(first) <= 8 * 32
    assert backend.generate("What is two plus two?", 8) == first
    assert backend.peak_memory_bytes() > 0


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
