"""mlx_ft.fastmath: exp, softmax, attention and SwiGLU, each test run in both CPU tiers (the
native kernels of mlx_ft.native, and the powf-based plain ops), against float64 and against
MLX's own functions, values and gradients, edge cases; and the padding-free forward with them
equal to the forward without them."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_ft import fastmath


@pytest.fixture(autouse=True, params=["native", "powf"])
def _cpu_fast_path(request, monkeypatch):
    if not fastmath.enabled():
        pytest.skip("the fast exp runs on a CPU device only")
    monkeypatch.setenv("POSTTRAIN_MLX_NATIVE", "1" if request.param == "native" else "0")


def _x(shape, scale=3.0, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _relative_error(f, x):
    got = np.array(f(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    return np.abs(got - want) / want


@pytest.mark.parametrize("low, high, bound", [(-5, 5, 4e-7), (-20, 20, 1.2e-6),
                                              (-87.3, 88.7, 4.5e-6)])
def test_exp_is_as_precise_as_mlx_exp(low, high, bound):
    x = np.concatenate([np.linspace(low, high, 200_001, dtype=np.float32),
                        np.clip(_x(10_000), low, high)])
    ours, mlx_own = _relative_error(fastmath.exp, x), _relative_error(mx.exp, x)
    assert ours.max() < bound
    assert ours.max() <= 1.05 * mlx_own.max() and ours.mean() <= 1.05 * mlx_own.mean()


def test_exp_edges():
    x = mx.array([-np.inf, -1e4, -104.0, 0.0, 89.0, 1e4, np.inf, np.nan], dtype=mx.float32)
    got = np.array(fastmath.exp(x))
    np.testing.assert_array_equal(got[:7], [0.0, 0.0, 0.0, 1.0, np.inf, np.inf, np.inf])
    assert np.isnan(got[7])


def test_exp_gradient_is_its_value():
    x = mx.array(_x((64, 33)))
    g = np.array(mx.grad(lambda a: (fastmath.exp(a) * 2.0).sum())(x))
    np.testing.assert_allclose(g, 2 * np.exp(np.array(x).astype(np.float64)), rtol=1e-6)


def _softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_and_its_gradient():
    x = _x((6, 5, 300), scale=4.0)
    x[0, 0, 7:] = -np.inf  # a masked row keeps its allowed entries
    np.testing.assert_allclose(np.array(fastmath.softmax(mx.array(x))), _softmax64(x),
                               rtol=2e-6, atol=1e-9)
    w = mx.array(_x((6, 5, 300), seed=3))
    got = mx.grad(lambda a: (fastmath.softmax(a) * w).sum())(mx.array(x))
    want = mx.grad(lambda a: (mx.softmax(a, axis=-1, precise=True) * w).sum())(mx.array(x))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("before", [0, 5])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3)])
def test_attention_and_its_gradients_equal_mlx_sdpa(before, heads, kv_heads, monkeypatch):
    length, d = 11, 16
    q = mx.array(_x((1, heads, length, d), scale=1.0))
    k = mx.array(_x((1, kv_heads, before + length, d), scale=1.0, seed=1))
    v = mx.array(_x((1, kv_heads, before + length, d), seed=2))
    w = mx.array(_x((1, heads, length, d), seed=3))
    mask = fastmath.attention_mask(length, before)
    assert mask.dtype == mx.float32 and mask.shape == (length, before + length)
    monkeypatch.setenv("POSTTRAIN_MLX_FAST_EXP", "0")
    plain = fastmath.attention_mask(length, before)
    assert plain == "causal" if before == 0 else plain.dtype == mx.bool_

    def loss(mask):
        return lambda q, k, v: (fastmath.attention(q, k, v, 0.25, mask) * w).sum()

    want = mx.value_and_grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setenv("POSTTRAIN_MLX_FAST_EXP", "1")
    got = mx.value_and_grad(loss(mask), argnums=(0, 1, 2))(q, k, v)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=2e-6)


def test_swiglu_and_its_gradients_equal_mlx():
    gate, up = mx.array(_x((50, 64))), mx.array(_x((50, 64), seed=1))
    w = mx.array(_x((50, 64), seed=2))

    def plain(g, u):
        return g * mx.sigmoid(g) * u

    np.testing.assert_allclose(np.array(fastmath.swiglu(gate, up)), np.array(plain(gate, up)),
                               rtol=1e-6, atol=1e-6)
    got = mx.grad(lambda g, u: (fastmath.swiglu(g, u) * w).sum(), argnums=(0, 1))(gate, up)
    want = mx.grad(lambda g, u: (plain(g, u) * w).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_padding_free_loss_and_gradients_equal_mlx_own_functions(tiny_llama_dir, tiny_tokenizer,
                                                                 monkeypatch):
    """The varlen forward (packed documents, shared prefixes) with fastmath and without."""
    from test_backend_conformance import grads, make_backend
    from test_prefix_sharing import OTHER, PROMPT
    from tiny import make_batch

    from algorithms.sft import nll_loss

    batch = make_batch([[PROMPT + [7, 8, 9]], [PROMPT + [60, 61]], [OTHER + [5], [11, 12, 13]]])
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("POSTTRAIN_MLX_FAST_EXP", switch)
        backend = make_backend("mlx", tiny_llama_dir, tiny_tokenizer, fine_tune_type="full")
        metrics = backend.forward_backward(batch, nll_loss)
        results.append((metrics["loss"], grads(backend)))
    (loss_fast, g_fast), (loss_plain, g_plain) = results
    assert loss_fast == pytest.approx(loss_plain, rel=2e-6)
    for key, want in g_plain.items():
        np.testing.assert_allclose(g_fast[key], want, rtol=1e-4, atol=2e-6, err_msg=key)


def test_switch_off_gives_mlx_itself(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_MLX_FAST_EXP", "0")
    x = mx.array(_x((4, 7)))
    np.testing.assert_array_equal(np.array(fastmath.exp(x)), np.array(mx.exp(x)))
    np.testing.assert_array_equal(np.array(fastmath.softmax(x)),
                                  np.array(mx.softmax(x, axis=-1, precise=True)))
