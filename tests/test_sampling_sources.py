"""``Backend.sample``'s sources on both backends: the reference (XPO's second completion), the
geometric mixture of policy and reference (Nash-MD), the policy; the mixture's next-token
distribution against an oracle built from full forward passes of both models."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.rl.sampling import SamplingParams

MESSAGES = ["say hi", "What is two plus two?"]


@pytest.fixture(scope="module")
def backends(tiny_llama_dir, tiny_qwen2_dir, tiny_tokenizer):
    """Both backends with the tiny Llama as policy and the tiny Qwen2 (same tokenizer, other
    weights) as ``--ref-model``, so policy and reference differ clearly."""
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    from algorithms.preference.config import ReferenceConfig
    from cuda_ft.backend import TorchBackend
    from mlx_ft.backend import MLXBackend

    cfg = ReferenceConfig(data="unused", dtype="float32", ref_model=str(tiny_qwen2_dir))
    return {"mlx": MLXBackend(cfg, tiny_llama_dir, tiny_tokenizer),
            "torch": TorchBackend(cfg, tiny_llama_dir, tiny_tokenizer)}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    from algorithms.data import render_prompt

    return [render_prompt(tiny_tokenizer, m) for m in MESSAGES]


def _ids(backend, prompts, **kw):
    params = SamplingParams(max_tokens=6, temperature=0.03, batch_size=1, **kw)
    return [c.ids for c in backend.sample(prompts * 2, params, seed=11)]


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_each_source_samples_its_model(backends, prompts, name):
    backend = backends[name]
    policy, reference = _ids(backend, prompts), _ids(backend, prompts, source="reference")
    assert policy != reference  # two different models at a low temperature
    # the mixture's end points are the two models (same seed, same draws)
    assert _ids(backend, prompts, source="mixture", mixture_coef=0.0) == policy
    assert _ids(backend, prompts, source="mixture", mixture_coef=1.0) == reference
    assert _ids(backend, prompts) == policy  # the policy is left as it was
    with pytest.raises(ValueError, match="--teacher"):
        _ids(backend, prompts, source="teacher")


def _log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _oracle_logits(backends, ids):
    """float64 next-token log-probs of the policy and the reference after ``ids``: full
    forward passes (no cache) of the MLX models, independent of both sampling paths."""
    import mlx.core as mx

    backend = backends["mlx"]
    policy = np.array(backend.model(mx.array([ids]))[0, -1].astype(mx.float32), np.float64)
    with backend.reference.model() as ref:
        reference = np.array(ref(mx.array([ids]))[0, -1].astype(mx.float32), np.float64)
    return _log_softmax(policy), _log_softmax(reference)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_mixture_first_token_frequencies(backends, prompts, name):
    """First tokens of the 0.3-mixture at T = 0.05, top-k 4, follow softmax(((1 - c) log pi +
    c log ref) / T) over its top 4, within 4.5 standard errors; neither model alone does."""
    c, temperature, n = 0.3, 0.05, 200
    lp, lr = _oracle_logits(backends, prompts[0])
    mixed = (1 - c) * lp + c * lr
    top = np.argsort(-mixed)[:4]

    def expected(z):
        p = np.exp((z[top] - z[top].max()) / temperature)
        return p / p.sum()

    got = backends[name].sample([prompts[0]] * n, SamplingParams(
        max_tokens=1, temperature=temperature, top_k=4, source="mixture", mixture_coef=c),
        seed=5)
    firsts = np.array([g.ids[0] for g in got])
    assert np.isin(firsts, top).all()
    freq = np.array([(firsts == t).mean() for t in top])
    want = expected(mixed)
    np.testing.assert_array_less(np.abs(freq - want), 4.5 * np.sqrt(want * (1 - want) / n) + 1e-9)
    assert np.abs(freq - expected(lp)).max() > 0.1 or np.abs(freq - expected(lr)).max() > 0.1


def test_torch_mixture_keeps_both_caches_aligned_as_rows_leave(backends, prompts):
    """Left-padded prompts of different lengths, four decode steps, the first row ending at
    step 2: at every step each remaining row is sampled from ``(1 - c) log softmax(policy) +
    c log softmax(reference)`` of the two models' full (uncached, unpadded) forwards."""
    import torch

    from cuda_ft.decode import decode
    from cuda_ft.rollout import left_pad

    backend, c, eos = backends["torch"], 0.4, 2
    prompts = [list(prompts[0]), list(prompts[1]), list(prompts[1][:-3])]
    ids, mask = left_pad(prompts, 0, backend.device)
    rng = np.random.default_rng(0)
    seen = []

    def sampler(scores, rows):
        """Records the mixed scores; row 0 draws EOS at its second step, the others random
        tokens (never EOS)."""
        step = len(seen)
        seen.append((list(rows), scores.double().numpy()))
        return torch.tensor([eos if (row == 0 and step == 1) else int(rng.integers(3, 300))
                             for row in rows])

    params = SamplingParams(max_tokens=4, source="mixture", mixture_coef=c)
    with torch.no_grad():
        got = decode(backend.model, ids, mask, params, sampler, [eos], None,
                     reference=backend.reference.model)
    assert [rows for rows, _ in seen] == [[0, 1, 2], [0, 1, 2], [1, 2], [1, 2]]
    assert len(got[0]) == 2 and got[0][-1] == eos and [len(g) for g in got[1:]] == [4, 4]
    for step, (rows, scores) in enumerate(seen):
        for i, row in enumerate(rows):
            context = torch.tensor([prompts[row] + got[row][:step]])
            with torch.no_grad():
                z = backend.model(input_ids=context).logits[0, -1].double().numpy()
                with backend.reference.model() as ref:
                    zr = ref(input_ids=context).logits[0, -1].double().numpy()
            want = (1 - c) * _log_softmax(z) + c * _log_softmax(zr)
            np.testing.assert_allclose(scores[i], want, rtol=0, atol=2e-5,
                                       err_msg=f"step {step} row {row}")


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_lora_reference_samples_the_base(name, tiny_llama_dir, tiny_tokenizer, prompts):
    """Without --ref-model the reference is the base with adapters disabled: after the adapters
    are made large, the reference still samples what an untouched model samples."""
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    from algorithms.preference.config import ReferenceConfig
    from cuda_ft.backend import TorchBackend
    from mlx_ft.backend import MLXBackend

    cls = {"mlx": MLXBackend, "torch": TorchBackend}[name]
    cfg = ReferenceConfig(data="unused", dtype="float32")
    base = _ids(cls(cfg, tiny_llama_dir, tiny_tokenizer), prompts)
    backend = cls(cfg, tiny_llama_dir, tiny_tokenizer)
    _scale_lora_b(backend, name)
    assert _ids(backend, prompts) != base
    assert _ids(backend, prompts, source="reference") == base
    assert _ids(backend, prompts, source="mixture", mixture_coef=1.0) == base


def _scale_lora_b(backend, name):
    rng = np.random.default_rng(3)
    if name == "torch":
        import torch

        with torch.no_grad():
            for key, p in backend.params.items():
                if "lora_B" in key:
                    p.copy_(torch.tensor(rng.normal(0, 2.0, p.shape), dtype=p.dtype))
        return
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mlx_ft.model import trainable

    params = trainable(backend.model)
    backend.model.update(tree_unflatten([
        (k, mx.array(rng.normal(0, 2.0, v.shape).astype(np.float32)))
        for k, v in params.items() if "lora_b" in k]))
