"""mlx_ft.native: the fused C++ CPU kernels against float64 references (values, edges,
layouts, bad inputs), and the loader: where it builds, what it does when it cannot."""

from __future__ import annotations

import os

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_ft import native


@pytest.fixture(scope="module")
def K():
    if not native.enabled():
        pytest.skip("POSTTRAIN_MLX_NATIVE=0")
    kernels = native.kernels()
    assert kernels is not None, f"the native kernels did not load: {native.status()}"
    return kernels


def _x(shape, scale=3.0, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _np(a):
    return np.array(a).astype(np.float64)


def test_exp_over_the_float32_range(K):
    x = np.linspace(-110.0, 90.0, 400_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    got = _np(K.exp(mx.array(x)))
    normal = (want > 1.18e-38) & (want < 3.4e38)
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 2e-7
    tiny = want <= 1.18e-38  # subnormal results round correctly (to the nearest 2^-149)
    assert np.max(np.abs(got[tiny] - want[tiny])) <= 2.0 ** -149
    assert np.all(np.isinf(got[want >= 3.41e38]))


def test_exp_edges(K):
    x = mx.array([-np.inf, -1e4, -104.0, -0.0, 0.0, 88.72, 89.0, 1e4, np.inf, np.nan])
    got = np.array(K.exp(x))
    np.testing.assert_array_equal(got[:5], [0.0, 0.0, 0.0, 1.0, 1.0])
    assert got[5] == pytest.approx(np.exp(np.float64(np.float32(88.72))), rel=2e-7)
    assert np.all(np.isinf(got[6:9])) and np.isnan(got[9])


def test_inputs_of_any_layout_and_dtype(K):
    x = _x((37, 53))
    strided = mx.array(x).T[::2]  # transposed and sliced: not contiguous
    np.testing.assert_allclose(np.array(K.exp(strided)), np.exp(x.T[::2].astype(np.float64)),
                               rtol=2e-7)
    half = mx.array(x[:3, :5]).astype(mx.bfloat16)
    out = K.exp(half)
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), np.exp(np.array(half.astype(mx.float32))),
                               rtol=2e-7)
    assert K.exp(mx.zeros((0, 4))).shape == (0, 4)


def _sigmoid64(g):
    return 1.0 / (1.0 + np.exp(-g))


def test_swiglu_and_its_gradient(K):
    g, u, c = _x((70, 96), scale=6.0), _x((70, 96), seed=1), _x((70, 96), seed=2)
    g[0, :4] = [-200.0, 200.0, 0.0, -90.0]
    g64, u64, c64 = g.astype(np.float64), u.astype(np.float64), c.astype(np.float64)
    s = _sigmoid64(g64)
    np.testing.assert_allclose(_np(K.swiglu(mx.array(g), mx.array(u))), g64 * s * u64,
                               rtol=1e-6, atol=1e-30)
    dg, du = K.swiglu_grad(mx.array(c), mx.array(g), mx.array(u))
    np.testing.assert_allclose(_np(dg), c64 * u64 * s * (1 + g64 * (1 - s)), rtol=2e-6,
                               atol=1e-6)
    np.testing.assert_allclose(_np(du), c64 * g64 * s, rtol=2e-6, atol=1e-30)


def _softmax64(x):
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isinf(m), 0.0, m))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def test_softmax_with_a_broadcast_bias(K):
    x = _x((2, 3, 7, 19), scale=5.0)
    bias = np.where(np.arange(19)[None] <= np.arange(7)[:, None] + 12, 0.0, -np.inf)
    got = _np(K.softmax(mx.array(x), mx.array(bias.astype(np.float32))))
    # x + bias - max is rounded to float32 before the exp, as in any float32 softmax: ~1e-6
    # relative on the smallest probabilities
    np.testing.assert_allclose(got, _softmax64(x + bias), rtol=2e-6, atol=1e-9)
    assert np.all(got[..., 0, 13:] == 0.0)  # masked keys get exactly 0
    np.testing.assert_allclose(_np(K.softmax(mx.array(x))), _softmax64(x), rtol=2e-6, atol=1e-9)


def test_softmax_of_a_fully_masked_row_is_zero(K):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, -np.inf]], dtype=np.float32)
    got = np.array(K.softmax(mx.array(x)))
    np.testing.assert_array_equal(got[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(got[1], _softmax64(x[1:])[0], rtol=1e-6)


def test_softmax_gradient(K):
    p = _softmax64(_x((5, 4, 33), scale=4.0)).astype(np.float32)
    dp = _x((5, 4, 33), seed=1)
    p64, dp64 = p.astype(np.float64), dp.astype(np.float64)
    want = p64 * (dp64 - (p64 * dp64).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(_np(K.softmax_grad(mx.array(p), mx.array(dp))), want,
                               rtol=1e-5, atol=1e-7)


def test_exp_shift_sum_over_a_vocabulary(K):
    z = _x((6, 49_152), scale=8.0)
    z[1] = -np.inf
    e, m, s = K.exp_shift_sum(mx.array(z))
    z64 = z.astype(np.float64)
    m64 = np.where(np.isinf(z64.max(axis=-1)), 0.0, z64.max(axis=-1))
    # the exp of z - m as rounded to float32 (the kernel's input to exp): exact to 2e-7
    e64 = np.exp((z - m64[:, None].astype(np.float32)).astype(np.float64))
    np.testing.assert_array_equal(np.array(m), m64.astype(np.float32))
    np.testing.assert_allclose(_np(e), e64, rtol=2e-7, atol=1e-45)
    np.testing.assert_allclose(_np(s), e64.sum(axis=-1), rtol=2e-7)  # float64 accumulation
    assert s.shape == (6,) and float(s[1]) == 0.0


def _rope64(x, positions, base, scale, traditional):
    half = x.shape[-1] // 2
    theta = (positions * scale)[:, None] * base ** (-np.arange(half) / half)[None]
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x = x.astype(np.float64)
    a, b = (x[..., 0::2], x[..., 1::2]) if traditional else (x[..., :half], x[..., half:])
    ra, rb = a * c - b * s, b * c + a * s
    if traditional:
        return np.stack([ra, rb], axis=-1).reshape(x.shape)
    return np.concatenate([ra, rb], axis=-1)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_against_float64_and_mlx(K, traditional):
    from mlx import nn

    from mlx_ft import fastmath

    x = _x((23, 5, 16), scale=1.0)
    positions = np.concatenate([np.arange(7) + 3, np.arange(16)])  # two spans, two offsets
    rope = nn.RoPE(16, traditional=traditional, base=500.0, scale=0.5)
    tables = fastmath.rotary_tables(rope, positions)
    got = fastmath.rotary(mx.array(x), tables)
    np.testing.assert_allclose(_np(got), _rope64(x, positions, 500.0, 0.5, traditional),
                               rtol=1e-5, atol=2e-6)
    mlx_own = rope(mx.array(x[7:]).transpose(1, 0, 2)[None])[0].transpose(1, 0, 2)
    np.testing.assert_allclose(np.array(got[7:]), np.array(mlx_own), atol=1e-6)
    cot = mx.array(_x((23, 5, 16), seed=5))  # the gradient is the inverse rotation
    grad = mx.vjp(lambda a: fastmath.rotary(a, tables), [mx.array(x)], [cot])[1][0]
    want = mx.vjp(lambda a: rope(a.transpose(1, 0, 2)[None])[0].transpose(1, 0, 2),
                  [mx.array(x[7:])], [cot[7:]])[1][0]
    np.testing.assert_allclose(np.array(grad[7:]), np.array(want), atol=1e-6)


def test_rotary_tables_only_for_a_plain_rope(K):
    from mlx import nn

    from mlx_ft import fastmath

    class Scaled(nn.RoPE):
        pass

    assert fastmath.rotary_tables(nn.RoPE(8), np.arange(4)) is not None
    assert fastmath.rotary_tables(Scaled(8), np.arange(4)) is None


def test_rms_norm_and_its_gradients(K):
    from mlx import nn

    from mlx_ft import fastmath

    x, g = _x((2, 31, 48)), _x((2, 31, 48), seed=1)
    norm = nn.RMSNorm(48, eps=1e-5)
    norm.weight = mx.array(_x((48,), scale=1.0, seed=2))
    x64, w64, g64 = x.astype(np.float64), np.array(norm.weight).astype(np.float64), \
        g.astype(np.float64)
    r = 1 / np.sqrt((x64 ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_np(fastmath.rms_norm(norm, mx.array(x))), x64 * r * w64,
                               rtol=2e-6, atol=1e-6)
    dx, dw = K.rms_norm_grad(mx.array(x), norm.weight, mx.array(g), 1e-5)
    wg = w64 * g64
    want_dx = r * (wg - x64 * r ** 2 * (wg * x64).mean(axis=-1, keepdims=True))
    np.testing.assert_allclose(_np(dx), want_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(dw), (g64 * x64 * r).sum(axis=(0, 1)), rtol=1e-5,
                               atol=1e-5)
    got = mx.grad(lambda a, w: (fastmath.rms_norm(_with(norm, w), a) * mx.array(g)).sum(),
                  argnums=(0, 1))(mx.array(x), norm.weight)
    want = mx.grad(lambda a, w: (mx.fast.rms_norm(a, w, 1e-5) * mx.array(g)).sum(),
                   argnums=(0, 1))(mx.array(x), norm.weight)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def _with(norm, weight):
    norm.weight = weight
    return norm


@pytest.mark.parametrize("axis", [-1, 0])
def test_logsumexp_and_its_gradient_on_any_axis(K, axis):
    """precise.logsumexp through the kernel (float64 sum), over a moved axis of a 3-D
    strided input; the gradient (recomputed from the input) is the softmax."""
    from mlx_ft import precise

    z = _x((5, 6, 300), scale=4.0)
    x = mx.array(z)[:, :, ::2]
    sub = z[:, :, ::2].astype(np.float64)
    m = sub.max(axis=axis, keepdims=True)
    want = np.log(np.exp(sub - m).sum(axis=axis, keepdims=True)) + m
    np.testing.assert_allclose(_np(precise.logsumexp(x, axis=axis, keepdims=True)), want,
                               rtol=1e-6, atol=1e-6)
    w = mx.array(_x(np.squeeze(want, axis).shape, seed=7))
    got = mx.grad(lambda a: (precise.logsumexp(a, axis=axis) * w).sum())(x)
    soft = np.exp(sub - want) * np.expand_dims(np.array(w), axis)
    np.testing.assert_allclose(_np(got), soft, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("call, message", [
    (lambda K: K.swiglu(mx.zeros((2, 3)), mx.zeros((3, 2))), "same shape"),
    (lambda K: K.swiglu_grad(mx.zeros((2, 3)), mx.zeros((2, 3)), mx.zeros((2, 4))),
     "same shape"),
    (lambda K: K.softmax(mx.zeros((2, 4, 5)), mx.zeros((4, 6))), "bias must be"),
    (lambda K: K.softmax(mx.zeros((2, 0))), "non-empty last axis"),
    (lambda K: K.softmax_grad(mx.zeros((2, 3)), mx.zeros((2, 4))), "same shape"),
    (lambda K: K.exp_shift_sum(mx.zeros(())), "non-empty last axis"),
    (lambda K: K.rope(mx.zeros((4, 2, 8)), mx.zeros((4, 3)), mx.zeros((4, 3))), "needs x"),
    (lambda K: K.rope(mx.zeros((4, 8)), mx.zeros((4, 4)), mx.zeros((4, 4))), "needs x"),
    (lambda K: K.rms_norm(mx.zeros((3, 8)), mx.zeros((7,)), 1e-5), "weight must be"),
    (lambda K: K.rms_norm_grad(mx.zeros((3, 8)), mx.zeros((8,)), mx.zeros((3, 7)), 1e-5),
     "same shape"),
])
def test_bad_inputs_are_refused_with_the_rule(K, call, message):
    with pytest.raises(ValueError, match=message):
        call(K)


def test_gradients_through_fastmath_match_the_powf_tier(K, monkeypatch):
    """The same fastmath functions with the kernels and without (POSTTRAIN_MLX_NATIVE=0)."""
    from mlx_ft import fastmath

    x = mx.array(_x((3, 9, 40)))
    w = mx.array(_x((3, 9, 40), seed=4))

    def grads():
        f = lambda a: ((fastmath.softmax(a) + fastmath.swiglu(a, w) + fastmath.exp(a / 4)) * w)
        return mx.value_and_grad(lambda a: f(a).sum())(x)

    native_value, native_grad = grads()
    monkeypatch.setenv("POSTTRAIN_MLX_NATIVE", "0")
    plain_value, plain_grad = grads()
    assert native_value.item() == pytest.approx(plain_value.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(native_grad), np.array(plain_grad), rtol=1e-5,
                               atol=1e-6)


def test_build_is_cached_under_a_key_of_its_inputs(K, tmp_path, monkeypatch):
    path = native.build()  # already built by the fixture: returns the cached library
    assert path.parent.name == native.build_key() and path.exists()
    assert path.parent.parent == native.cache_root()
    monkeypatch.setenv("POSTTRAIN_NATIVE_CACHE", str(tmp_path / "elsewhere"))
    assert native.cache_root() == tmp_path / "elsewhere"


@pytest.mark.parametrize("missing, reason", [("cmake", "no 'cmake' on PATH"),
                                              ("compiler", "no C++ compiler on PATH")])
def test_without_build_tools_the_backend_falls_back(missing, reason, tmp_path, monkeypatch,
                                                    capsys):
    """No CMake (or no compiler) and nothing cached: kernels() is None, the reason is printed
    once, and fastmath still computes (plain MLX ops)."""
    from mlx_ft import fastmath

    monkeypatch.setenv("POSTTRAIN_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler
    monkeypatch.delenv("CXX", raising=False)
    if missing == "cmake":
        monkeypatch.setattr(native, "_cmake", lambda: None)
    else:
        monkeypatch.setattr(native, "_cmake", lambda: "/usr/bin/cmake")
    monkeypatch.setattr(native, "_state", {})
    assert native.kernels() is None
    err = capsys.readouterr().err
    assert f"native CPU kernels unavailable ({reason}" in err
    assert "python -m mlx_ft.native" in err
    assert native.status().startswith(f"unavailable: {reason}")
    x = np.array([0.5, -3.0], dtype=np.float32)
    np.testing.assert_allclose(np.array(fastmath.exp(mx.array(x))), np.exp(x), rtol=1e-6)
    assert not list((tmp_path / "cache").glob("*/_kernels*"))  # nothing half-built left


def test_a_failing_build_names_its_step_and_leaves_nothing(tmp_path, monkeypatch):
    """A compiler that fails: BuildError with CMake's tail, no library in the cache."""
    compiler = tmp_path / "bin" / "c++"
    compiler.parent.mkdir()
    compiler.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("POSTTRAIN_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.raises(native.BuildError, match="cmake configure failed"):
        native.build()
    assert not list((tmp_path / "cache").glob("*/_kernels*"))
    assert not list((tmp_path / "cache").glob(".*"))  # the temporary build dir is gone


def test_switched_off(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_MLX_NATIVE", "0")
    assert native.kernels() is None
    assert native.status() == "switched off (POSTTRAIN_MLX_NATIVE=0)"


def test_cli_refuses_unknown_arguments():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mlx_ft.native", "--bogus"], check=False,
                          capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 2
    assert "unknown argument '--bogus'" in done.stderr
