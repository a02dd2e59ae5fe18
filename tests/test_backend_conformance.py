"""The backend conformance suite: every property a backend must have, written once and run on
every backend (MLX and torch), on the tiny models in float32.

A new backend passes this file (add it to BACKENDS) before anything else. Cross-backend
equality (MLX == torch on the same weights) lives in test_parity.py and the parity tests of
the CLIs; here each backend is checked against plain references.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx")
torch = pytest.importorskip("torch")

from tiny import DOC_A, DOC_B, DOC_C, DOC_D, make_batch

from algorithms.backend import Loss, lora_a_init, value_head_init
from algorithms.config import TrainConfig
from algorithms.rl.presets import PPOConfig
from algorithms.sft import nll_loss

BACKENDS = {"mlx": "mlx_ft.backend:MLXBackend", "torch": "cuda_ft.backend:TorchBackend"}


def make_backend(name: str, model_dir, tokenizer, value_head: bool = False, **overrides):
    from algorithms.cli import load_backend_class

    options = {"data": "x", "fine_tune_type": "lora", "lora_rank": 4, "lora_alpha": 8.0,
               "logprob_chunk_size": 7, "learning_rate": 1e-2, "seed": 3, "dtype": "float32"}
    options.update(overrides)
    cfg = (PPOConfig(reward=["r"], max_completion_length=8, **options) if value_head
           else TrainConfig(**options))
    return load_backend_class(BACKENDS[name])(cfg, model_dir, tokenizer)


def sft_and_value_loss() -> Loss:
    """NLL plus a value regression (values towards 1): every trainable group, the value head
    included, gets a gradient."""

    def fn(ops, outputs, batch):
        nll, metrics = nll_loss(ops, outputs["logps"], batch)
        mask = batch["loss_mask"]
        value = ops.sum(ops.square(outputs["values"] - 1.0) * mask) / batch["num_items"]
        return nll + value, metrics

    return Loss(fn, {"logps": True, "values": True})


def grads(backend) -> dict[str, np.ndarray]:
    """The accumulated gradient of every trainable parameter, by canonical name."""
    if backend.name == "mlx":
        from mlx.utils import tree_flatten

        from mlx_ft.model import to_canonical

        return to_canonical(dict(tree_flatten(backend._grads)), backend.cfg.fine_tune_type)
    return {k: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy())
            for k, p in backend.params.items()}


def full_logits_reference(model_dir, batch: dict, temperature: float) -> dict[str, np.ndarray]:
    """Every head output from transformers' full logits in float64, document by document (no
    backend code involved), and the final hidden states for the value head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    shape = batch["input_ids"].shape
    out = {k: np.zeros(shape) for k in ("logps", "entropy", "log_sum_sq")}
    hidden = np.zeros((*shape, model.config.hidden_size))
    seg = batch["segment_ids"]
    for b in range(shape[0]):
        for s in range(1, seg[b].max() + 1):
            cols = np.nonzero(seg[b] == s)[0]
            ids = torch.tensor(batch["input_ids"][b, cols][None].astype(np.int64))
            with torch.no_grad():
                h = model.model(ids).last_hidden_state
                logp = (model.lm_head(h) / temperature).log_softmax(-1)[0]
            targets = torch.tensor(batch["targets"][b, cols].astype(np.int64))
            out["logps"][b, cols] = logp.gather(-1, targets[:, None])[:, 0].numpy()
            out["entropy"][b, cols] = -(logp.exp() * logp).sum(-1).numpy()
            out["log_sum_sq"][b, cols] = torch.logsumexp(2 * logp, -1).numpy()
            hidden[b, cols] = h[0].numpy()
    out["hidden"] = hidden
    return out


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("padding_free", [True, False])
def test_outputs_equal_full_logits(name, temperature, padding_free, tiny_llama_dir,
                                   tiny_tokenizer, monkeypatch):
    """logps, entropy and log sum p^2 at a temperature, and the value head's values, from one
    chunked pass equal the formulas on full float64 logits; padded and packed rows."""
    monkeypatch.setenv("POSTTRAIN_MLX_VARLEN", "1" if padding_free else "0")
    monkeypatch.setenv("POSTTRAIN_TORCH_VARLEN", "1" if padding_free else "0")
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True,
                           fine_tune_type="full")
    batch = make_batch([[DOC_A, DOC_B], [DOC_D], [DOC_C]], length=16)
    batch["temperature"] = np.float32(temperature)
    got = backend.forward(batch, ("logps", "entropy", "log_sum_sq", "values"))
    want = full_logits_reference(tiny_llama_dir, batch, temperature)
    head = backend.trainable_parameters()
    want["values"] = want["hidden"] @ head["v_head.weight"][0] + head["v_head.bias"][0]
    real = batch["segment_ids"] > 0
    for key in ("logps", "entropy", "log_sum_sq", "values"):
        assert got[key].shape == real.shape and got[key].dtype == np.float32
        np.testing.assert_allclose(got[key][real], want[key][real], atol=2e-5, err_msg=key)
    assert np.abs(want["entropy"][real]).min() > 0.1  # the checks above can fail
    # a pass computes only what was asked
    assert set(backend.forward(batch, ("entropy",))) == {"entropy"}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_forward_refuses_what_it_cannot_give(name, tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer)
    batch = make_batch([[DOC_A]])
    with pytest.raises(ValueError, match="unknown model outputs"):
        backend.forward(batch, ("logits",))
    with pytest.raises(ValueError, match="value head"):
        backend.forward(batch, ("values",))


@pytest.mark.parametrize("name", list(BACKENDS))
def test_packed_documents_are_isolated(name, tiny_llama_dir, tiny_tokenizer):
    """Document 2 of a packed row sees nothing of document 1."""
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, fine_tune_type="full")
    packed = make_batch([[DOC_A, DOC_B], [DOC_C, DOC_D, DOC_A]], length=24)
    got = backend.per_token_logps(packed)
    alone = backend.per_token_logps(make_batch([[DOC_B], [DOC_D], [DOC_A]]))
    a, b, c, d = len(DOC_A), len(DOC_B), len(DOC_C), len(DOC_D)
    np.testing.assert_allclose(got[0, a:a + b - 1], alone[0, :b - 1], atol=1e-5)
    np.testing.assert_allclose(got[1, c:c + d - 1], alone[1, :d - 1], atol=1e-5)
    np.testing.assert_allclose(got[1, c + d:c + d + a - 1], alone[2, :a - 1], atol=1e-5)
    causal = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    leaked = backend.per_token_logps(causal)
    assert np.abs(leaked[0, a:a + b - 1] - alone[0, :b - 1]).max() > 1e-3


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_and_value_head_start_from_the_shared_init(name, kind, tiny_llama_dir,
                                                            tiny_tokenizer):
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    base = make_backend(name, tiny_llama_dir, tiny_tokenizer, fine_tune_type="full")
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True,
                           fine_tune_type=kind)
    np.testing.assert_allclose(backend.per_token_logps(batch), base.per_token_logps(batch),
                               atol=1e-6)
    params = backend.trainable_parameters()
    path = "model.layers.1.mlp.down_proj"
    a = params[f"{path}.lora_A"]
    np.testing.assert_array_equal(a, lora_a_init(3, path, a.shape[1], 4))
    assert not params[f"{path}.lora_B"].any()
    init = value_head_init(3, params["v_head.weight"].shape[1])
    np.testing.assert_array_equal(params["v_head.weight"], init["v_head.weight"])
    np.testing.assert_array_equal(params["v_head.bias"], init["v_head.bias"])


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_every_trainable_group_gets_a_gradient(name, kind, tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True,
                           fine_tune_type=kind)
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    loss = sft_and_value_loss()
    # At step 0 LoRA B = 0, so dL/dA is exactly zero: one step first makes B non-zero.
    backend.forward_backward(batch, loss)
    backend.optimizer_step(1e-2, 1.0)
    backend.forward_backward(batch, loss)
    zero = [k for k, g in grads(backend).items() if not np.abs(g).sum() > 0]
    assert not zero, f"no gradient reached {zero[:5]}"
    groups = {k.rsplit(".", 1)[-1] for k in grads(backend) if not k.startswith("v_head.")}
    if kind != "full":
        assert groups == {"lora_A", "lora_B"} | ({"magnitude"} if kind == "dora" else set())
    assert {"v_head.weight", "v_head.bias"} <= set(grads(backend))


def _adamw_by_hand(params, steps, cfg):
    """AdamW with bias correction, decoupled decay of the decayed names and clipping by the
    global norm, step by step: ``steps`` = [(grads, learning_rate, max_grad_norm)]."""
    from algorithms.weight_decay import is_decayed

    m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    v2 = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
    p = {k: v.astype(np.float64) for k, v in params.items()}
    b1, b2, eps = cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon
    for t, (g, lr, max_norm) in enumerate(steps, start=1):
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        scale = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        for k in p:
            if is_decayed(k, cfg.decay_norms_and_biases):
                p[k] *= 1 - lr * cfg.weight_decay
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk ** 2
            denom = np.sqrt(v2[k]) / np.sqrt(1 - b2 ** t) + eps
            p[k] -= lr / (1 - b1 ** t) * m[k] / denom
    return p


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_optimizer_step_is_adamw_by_hand(name, kind, tiny_llama_dir, tiny_tokenizer):
    """Three steps with a different learning rate each, clipped (norm above max), clipped
    (below: no change) and unclipped: the update (MLX compiles it once per run) is AdamW by
    hand, and the returned norm is the gradient's."""
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, fine_tune_type=kind,
                           weight_decay=0.1, adam_epsilon=1e-6)
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    start, steps = backend.trainable_parameters(), []
    for lr, max_norm in ((1e-2, 1e-3), (5e-3, 1e3), (2e-2, 0.0)):
        backend.forward_backward(batch, nll_loss)
        g = grads(backend)
        norm = backend.optimizer_step(lr, max_norm)
        assert norm == pytest.approx(np.sqrt(sum((x.astype(np.float64) ** 2).sum()
                                                 for x in g.values())), rel=1e-5)
        steps.append((g, lr, max_norm))
    want, got = _adamw_by_hand(start, steps, backend.cfg), backend.trainable_parameters()
    moved = 0
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=2e-7, err_msg=key)
        moved += not np.array_equal(got[key], start[key])
    assert moved == len(want)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_grad_accumulation_equals_one_big_batch(name, tiny_llama_dir, tiny_tokenizer):
    """4 micro-batches of 1 with num_items = all loss tokens == 1 batch of 4."""
    full = make_batch([[DOC_A], [DOC_B, DOC_C], [DOC_D], [DOC_C, DOC_A]], length=16)
    big = make_backend(name, tiny_llama_dir, tiny_tokenizer, adam_epsilon=1e-4)
    small = make_backend(name, tiny_llama_dir, tiny_tokenizer, adam_epsilon=1e-4)
    for _ in range(2):
        big.forward_backward(full, nll_loss)
        norm_big = big.optimizer_step(1e-2, 0.5)
        for i in range(4):
            micro = {k: v[i:i + 1] for k, v in full.items() if k != "num_items"}
            micro["num_items"] = full["num_items"]  # the whole accumulated step's count
            small.forward_backward(micro, nll_loss)
        norm_small = small.optimizer_step(1e-2, 0.5)
        assert norm_big == pytest.approx(norm_small, rel=1e-5)
    want, got = big.trainable_parameters(), small.trainable_parameters()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=2e-6, err_msg=key)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_resume_equals_uninterrupted_training(name, kind, tiny_llama_dir, tiny_tokenizer,
                                              tmp_path):
    """Bit for bit, with adapter dropout (RNG state), weight decay and a value head."""
    batches = [make_batch([[DOC_A, DOC_B], [DOC_D]]), make_batch([[DOC_C], [DOC_B]])] * 2
    options = {"fine_tune_type": kind, "lora_dropout": 0.1, "weight_decay": 0.01}
    loss = sft_and_value_loss()
    first = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True, **options)
    for i, batch in enumerate(batches):
        first.forward_backward(batch, loss)
        first.optimizer_step(1e-2, 1.0)
        if i == 1:
            first.save_state(str(tmp_path / "ckpt"))
    resumed = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True, **options)
    resumed.load_state(str(tmp_path / "ckpt"))
    for batch in batches[2:]:
        resumed.forward_backward(batch, loss)
        resumed.optimizer_step(1e-2, 1.0)
    want, got = first.trainable_parameters(), resumed.trainable_parameters()
    assert set(want) == set(got) and "v_head.weight" in want
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_reference_is_the_starting_model(name, tiny_llama_dir, tiny_tokenizer):
    """After training, ``forward(reference=True)`` is still the base model; the policy moved."""
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    base = make_backend(name, tiny_llama_dir, tiny_tokenizer,
                        fine_tune_type="full").per_token_logps(batch)
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer)
    for _ in range(3):
        backend.forward_backward(batch, nll_loss)
        backend.optimizer_step(5e-2, 1.0)
    np.testing.assert_allclose(backend.reference_per_token_logps(batch), base, atol=1e-6)
    assert np.abs(backend.per_token_logps(batch) - base).max() > 1e-3


def _load_elsewhere(name: str, kind: str, model_dir, out):
    """The saved artefact loaded by the library a user would take it to; a logits function."""
    if name == "mlx":
        import mlx.core as mx
        from mlx_lm.utils import load

        # a full fine-tune is a complete model dir; adapters load on the base
        model, _ = load(str(out)) if kind == "full" else load(str(model_dir),
                                                              adapter_path=str(out))
        return lambda ids: np.array(model(mx.array(ids)))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(out))
    model.eval()
    return lambda ids: model(input_ids=torch.tensor(ids.astype(np.int64))).logits.detach().numpy()


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_saved_artefacts_load_elsewhere(name, kind, tiny_llama_dir, tiny_tokenizer, tmp_path):
    """The adapters load in mlx-lm / PEFT / transformers with this backend's outputs, and the
    value head file holds the trained head."""
    from algorithms.backend import load_value_head

    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer, value_head=True,
                           fine_tune_type=kind)
    batch = make_batch([[DOC_A, DOC_B], [DOC_D]])
    for _ in range(2):
        backend.forward_backward(batch, sft_and_value_loss())
        backend.optimizer_step(1e-2, 1.0)
    out = tmp_path / kind
    out.mkdir()
    backend.save_adapters(str(out))
    logits = _load_elsewhere(name, kind, tiny_llama_dir, out)
    ids = np.array([DOC_A + DOC_B])
    want_logps = backend.per_token_logps(make_batch([[DOC_A + DOC_B]]))[0, :-1]
    logp = logits(ids)[0, :-1]
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logp.max(-1, keepdims=True)
    got_logps = np.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(got_logps, want_logps, atol=1e-4)
    head = load_value_head(out)
    params = backend.trainable_parameters()
    for key in ("v_head.weight", "v_head.bias"):
        np.testing.assert_array_equal(head[key], params[key])
    hidden = head["v_head.weight"].shape[1]
    assert not np.array_equal(head["v_head.weight"], value_head_init(3, hidden)["v_head.weight"])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_generate_is_greedy_and_deterministic(name, tiny_llama_dir, tiny_tokenizer):
    backend = make_backend(name, tiny_llama_dir, tiny_tokenizer)
    first = backend.generate("What is two plus two?", 8)
    assert isinstance(first, str) and backend.generate("What is two plus two?", 8) == first
    assert backend.peak_memory_bytes() > 0
