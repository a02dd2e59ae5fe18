"""mlx_ft.fastmath: the polynomial exp and the SwiGLU built on it against float64 and against
MLX's own functions, values and gradients, edge cases; and the padding-free forward with it
equal to the forward without it."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_ft import fastmath


@pytest.fixture(autouse=True)
def _cpu_fast_path():
    if not fastmath.enabled():
        pytest.skip("the polynomial exp runs on a CPU device only")


def _x(shape, scale=3.0, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_exp_is_within_two_ulp_of_float64_over_the_whole_range():
    x = np.concatenate([np.linspace(-87.3, 88.7, 200_001, dtype=np.float32), _x(10_000)])
    got = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 1.2e-7  # float32's ulp: 6e-8 to 1.2e-7
    mlx_own = np.array(mx.exp(mx.array(x))).astype(np.float64)
    assert np.max(np.abs(mlx_own - want) / want) > 2e-7  # mx.exp itself is coarser


def test_exp_edges():
    x = mx.array([-np.inf, -1e4, -88.0, 0.0, 89.0, 1e4, np.inf, np.nan], dtype=mx.float32)
    got = np.array(fastmath.exp(x))
    np.testing.assert_array_equal(got[:7], [0.0, 0.0, 0.0, 1.0, np.inf, np.inf, np.inf])
    assert np.isnan(got[7])


def test_exp_gradient_is_its_value():
    x = mx.array(_x((64, 33)))
    g = np.array(mx.grad(lambda a: (fastmath.exp(a) * 2.0).sum())(x))
    np.testing.assert_allclose(g, 2 * np.exp(np.array(x).astype(np.float64)), rtol=2.5e-7)


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
