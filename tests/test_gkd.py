"""GKD: the generalised JSD by hand (beta 0, 1 and between, temperature != 1, masked tokens),
the backends' chunked ``teacher_divergence`` output against the full-logits formula on a
50k-token vocabulary cut into chunks several ways (values and gradients), MLX vs torch on fixed
completions, and the loss's aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.distill.jsd import generalized_jsd
from algorithms.distill.loss import gkd_loss
from algorithms.ops import NumpyOps

ops = NumpyOps()
# two tokens over a vocabulary of 3
ZS = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
ZT = np.array([[0.0, 1.0, 0.0], [2.0, -1.0, 0.5]])


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p, q):
    return (p * np.log(p / q)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_end_points_are_the_two_kls(temperature):
    s, t = _softmax(ZS / temperature), _softmax(ZT / temperature)
    fwd = generalized_jsd(ops, ZS / temperature, ZT / temperature, 0.0)
    rev = generalized_jsd(ops, ZS / temperature, ZT / temperature, 1.0)
    np.testing.assert_allclose(fwd, _kl(t, s), rtol=1e-12)   # KL(teacher || student)
    np.testing.assert_allclose(rev, _kl(s, t), rtol=1e-12)   # KL(student || teacher)
    assert not np.allclose(fwd, rev)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_interior_is_the_generalised_jsd(beta):
    s, t = _softmax(ZS), _softmax(ZT)
    m = beta * t + (1 - beta) * s
    want = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    np.testing.assert_allclose(generalized_jsd(ops, ZS, ZT, beta), want, rtol=1e-12)
    # a distribution is at divergence 0 from itself, and JSD_0.5 is symmetric
    np.testing.assert_allclose(generalized_jsd(ops, ZS, ZS + 3.0, beta), 0.0, atol=1e-12)
    if beta == 0.5:
        np.testing.assert_allclose(generalized_jsd(ops, ZT, ZS, 0.5), want, rtol=1e-12)


def test_a_temperature_changes_the_divergence():
    cold, hot = (generalized_jsd(ops, ZS / t, ZT / t, 0.5) for t in (0.5, 3.0))
    assert (cold > hot).all()  # sharper distributions are further apart


def test_loss_masks_tokens_and_divides_by_the_step():
    divergence = np.array([[0.2, 0.4, 9.0], [0.1, 9.0, 9.0]])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, metrics = gkd_loss(ops, divergence, {"loss_mask": mask, "num_items": np.float64(6)})
    assert float(loss) == pytest.approx(0.7 / 6)
    assert float(metrics["divergence"]) == pytest.approx(0.7 / 3)
    alone, _ = gkd_loss(ops, divergence, {"loss_mask": mask})
    assert float(alone) == pytest.approx(0.7 / 3)


def test_matches_trls_generalized_jsd_loss():
    """TRL's GKDTrainer.generalized_jsd_loss (labels -100 masked, mean over the valid tokens)
    on random logits, every beta, temperature 1 and 1.5."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    rng = np.random.default_rng(0)
    zs, zt = rng.normal(0, 2, (2, 5, 11)), rng.normal(0, 2, (2, 5, 11))
    labels = np.array([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    mask = (labels != -100).astype(np.float64)
    for beta in (0.0, 0.3, 0.5, 1.0):
        for temperature in (1.0, 1.5):
            want = GKDTrainer.generalized_jsd_loss(
                torch.tensor(zs), torch.tensor(zt), torch.tensor(labels), beta=beta,
                temperature=temperature)
            per_token = generalized_jsd(ops, zs.reshape(10, 11) / temperature,
                                        zt.reshape(10, 11) / temperature, beta).reshape(2, 5)
            got, _ = gkd_loss(ops, per_token, {"loss_mask": mask})
            assert float(got) == pytest.approx(float(want), rel=1e-9), (beta, temperature)


# -- the backends' chunked output -------------------------------------------------------------

VOCAB = 50_000


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A student (tiny Llama) and a bigger teacher (tiny Qwen2, 3 layers of 96) over a 50k
    vocabulary (the tiny tokenizer's ids, the rest never sampled but in every softmax)."""
    from tiny import make_tiny_model

    student = make_tiny_model(tmp_path_factory.mktemp("student"), vocab_size=VOCAB)
    teacher = make_tiny_model(tmp_path_factory.mktemp("teacher"), family="qwen2", seed=4,
                              vocab_size=VOCAB, hidden_size=96, layers=3)
    return student, teacher


def _batch(beta=0.3, temperature=0.8):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 380, (2, 9)).astype(np.int32)
    seg = np.ones_like(ids)
    ids[1, 6:], seg[1, 6:] = 0, 0
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    mask = np.zeros(ids.shape, np.float32)
    mask[0, 2:8], mask[1, 3:5] = 1, 1
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "jsd_beta": np.float32(beta), "temperature": np.float32(temperature),
            "num_items": np.float32(mask.sum())}


def _full_formula(student, teacher, batch):
    """float64 divergences from the full [B, T, V] logits of both HF models."""
    import torch
    from transformers import AutoModelForCausalLM

    t = float(batch["temperature"])
    with torch.no_grad():
        zs, zt = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)(
            torch.tensor(batch["input_ids"]).long()).logits.double().numpy() / t
            for d in (student, teacher))
    return generalized_jsd(ops, zs.reshape(-1, VOCAB), zt.reshape(-1, VOCAB),
                           float(batch["jsd_beta"])).reshape(batch["input_ids"].shape)


def _backend(name, student, teacher, chunk, kind="lora"):
    from algorithms.cli import load_backend_class, load_tokenizer
    from algorithms.distill.config import GKDConfig

    spec = {"mlx": "mlx_ft.backend:MLXBackend", "torch": "cuda_ft.backend:TorchBackend"}[name]
    cfg = GKDConfig(data="x", teacher=str(teacher), dtype="float32", logprob_chunk_size=chunk,
                    fine_tune_type=kind)
    return load_backend_class(spec)(cfg, student, load_tokenizer(student))


def _grads(backend, name):
    if name == "mlx":
        from mlx.utils import tree_flatten

        from mlx_ft.model import to_canonical
        return to_canonical(dict(tree_flatten(backend._grads)), backend.cfg.fine_tune_type)
    return {k: p.grad.detach().numpy().copy() for k, p in backend.params.items()}


@pytest.mark.parametrize("name", ["mlx", "torch"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_divergence_equals_the_full_formula(name, beta, big_vocab):
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    from algorithms.distill.loss import make_loss

    student, teacher = big_vocab
    batch = _batch(beta=beta)
    want = _full_formula(student, teacher, batch)
    real = batch["segment_ids"] > 0
    grads = {}
    for chunk in (1, 7, 64, 4096):
        backend = _backend(name, student, teacher, chunk)
        got = backend.forward(batch, ("teacher_divergence",))["teacher_divergence"]
        np.testing.assert_allclose(got[real], want[real], rtol=2e-4, atol=1e-7)
        backend.forward_backward(batch, make_loss(backend.cfg))
        grads[chunk] = _grads(backend, name)
    assert want[real].min() > 0
    for chunk in (1, 7, 64):  # the gradient does not depend on the chunking either
        for key, value in grads[4096].items():
            np.testing.assert_allclose(grads[chunk][key], value, rtol=1e-3,
                                       atol=1e-5 * np.abs(value).max(), err_msg=key)
            if np.abs(value).max() > 0:  # (LoRA A has none while B = 0)
                error = np.linalg.norm(grads[chunk][key] - value) / np.linalg.norm(value)
                assert error < 1e-5, (key, chunk, error)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_loss_and_gradients_match_across_backends(kind, big_vocab):
    """Fixed completions, float32: the GKD loss and every gradient (a frozen head under LoRA,
    the trainable head too under full fine-tuning) agree between MLX and torch, non-zero."""
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    from algorithms.distill.loss import make_loss

    student, teacher = big_vocab
    results = {}
    for name in ("mlx", "torch"):
        backend = _backend(name, student, teacher, 16, kind)
        loss = make_loss(backend.cfg)
        if kind == "lora":  # a first step, so LoRA B != 0 (full fine-tuning needs none: an
            # AdamW step moves every weight by ~lr whatever its gradient's size, so gradients
            # at rounding level (~1e-9) that differ between backends would move the weights
            # apart by up to 2 lr and the second step's gradients by ~5e-7)
            backend.forward_backward(_batch(), loss)
            backend.optimizer_step(1e-2, 0.0)
        results[name] = (backend.forward_backward(_batch(), loss), _grads(backend, name))
    (m_mlx, g_mlx), (m_torch, g_torch) = results["mlx"], results["torch"]
    assert m_mlx["loss"] == pytest.approx(m_torch["loss"], rel=3e-5)
    assert m_mlx["divergence"] == pytest.approx(m_torch["divergence"], rel=3e-5)
    assert set(g_mlx) == set(g_torch)
    for key in g_mlx:
        atol = max(1e-7, 5e-5 * np.abs(g_torch[key]).max())
        np.testing.assert_allclose(g_mlx[key], g_torch[key], atol=atol, rtol=0, err_msg=key)
        assert np.abs(g_torch[key]).max() > 0, key
