"""SwiGLU and attention for MLX on a CPU, where ``mx.exp`` is slow.

MLX 0.32's CPU ``exp`` costs ~15-19 ns per float32 element (1.08M elements: 17-20 ms, against
0.4 ms for an add, on the 2-core x86 box of ``benchmarks/RESULTS.md``), while a compiled chain of
ten multiply-adds over the same array takes 0.7 ms. In the padding-free forward that is the
sigmoid of every SwiGLU activation and the softmax of every attention head.

Here ``exp(x) = 2^k exp(r)`` with ``k = round(x / ln 2)`` and ``r = x - k ln 2`` (ln 2 split in a
high and a low part, so ``r`` is exact to float32), ``|r| <= ln(2) / 2``, ``exp(r)`` by its
Taylor polynomial of degree 7 (truncation error ``r^8 / 8! < 6e-9``, below float32's 6e-8
rounding) and ``2^k`` written into the exponent bits: one compiled elementwise kernel for the
reduction and the polynomial, one multiply by the bit-cast ``2^k``. Max relative error ~1e-7
(``mx.exp``'s own: ~8e-7). Below ``LOW`` the result is 0 (``exp(-inf) = 0``), above ``HIGH``
``inf``; NaN stays NaN.

:func:`softmax` and :func:`swiglu` are built on it, each with a custom backward that keeps no
more than MLX's own (softmax: its output; SwiGLU: its inputs, the sigmoid recomputed);
:func:`attention` is the grouped-query product with that softmax, :func:`swiglu_mlp` a
llama-family MLP with that SwiGLU. On a GPU (Metal, CUDA), or with
``POSTTRAIN_MLX_FAST_EXP=0``, every function here is the plain MLX one.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx import nn

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 = HI + LO, HI exact in 9 bits
LOW, HIGH = -87.33654, 88.72283  # ln(2^-126), ln(float32 max)


def enabled() -> bool:
    """Whether the polynomial ``exp`` is used: on a CPU device, unless switched off."""
    return (mx.default_device().type == mx.DeviceType.cpu
            and os.environ.get("POSTTRAIN_MLX_FAST_EXP", "1") != "0")


def _reduce(x: mx.array) -> tuple[mx.array, mx.array]:
    """``(q, bits)`` with ``e^x = q * view_float32(bits)``: ``q = e^r`` (0 below ``LOW``, inf
    above ``HIGH``, NaN for NaN) and ``bits`` those of ``2^k``. Elementwise ops only, so one
    compiled kernel (the bit view itself cannot be compiled shape-free)."""
    a = mx.clip(x, LOW, HIGH)
    k = mx.floor(a * LOG2E + 0.5)
    r = a - k * LN2_HI - k * LN2_LO
    q = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (
        1 / 120 + r * (1 / 720 + r * (1 / 5040)))))))
    q = mx.where(x < LOW, 0.0, mx.where(x > HIGH, mx.inf, q))
    q = mx.where(k > 127, q * 2.0, q)  # 2^128 is not a float32: 2 * 2^127
    return q, (mx.minimum(k, 127).astype(mx.int32) + 127) << 23


_reduce_compiled = mx.compile(_reduce, shapeless=True)


@mx.custom_function
def _fast_exp(x: mx.array) -> mx.array:
    q, bits = _reduce_compiled(x.astype(mx.float32))
    return (q * bits.view(mx.float32)).astype(x.dtype)


@_fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """``e^x``, elementwise (module docstring)."""
    return _fast_exp(x) if enabled() else mx.exp(x)


@mx.custom_function
def _softmax_last(x: mx.array) -> mx.array:
    e = _fast_exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_last.vjp
def _softmax_last_vjp(primals, cotangent, output):
    # d softmax: p * (g - sum(g * p)); only the output is kept for the backward pass
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """``softmax(x)`` along ``axis``, the max shifted out; its backward keeps the output only."""
    if not enabled():
        return mx.softmax(x, axis=axis, precise=True)
    if axis % x.ndim != x.ndim - 1:
        return mx.moveaxis(_softmax_last(mx.moveaxis(x, axis, -1)), -1, axis)
    return _softmax_last(x)


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _fast_exp(-x))


def _swiglu_from(gate: mx.array, up: mx.array, e: mx.array) -> mx.array:
    return gate * up / (1.0 + e)  # e = exp(-gate)


def _swiglu_grads_from(cotangent: mx.array, gate: mx.array, up: mx.array,
                       e: mx.array) -> tuple[mx.array, mx.array]:
    # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) = 1 / (1 + e)
    s = 1.0 / (1.0 + e)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


_swiglu_compiled = mx.compile(_swiglu_from, shapeless=True)
_swiglu_grads = mx.compile(_swiglu_grads_from, shapeless=True)


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_compiled(gate, up, _fast_exp(-gate))


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals  # the sigmoid is recomputed from the inputs: one exp per element
    return _swiglu_grads(cotangent, gate, up, _fast_exp(-gate))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``; its backward keeps the inputs only and recomputes the sigmoid."""
    if not enabled():
        return gate * mx.sigmoid(gate) * up
    return _swiglu(gate, up)


def swiglu_mlp(mlp: nn.Module, x: mx.array) -> mx.array:
    """A llama-family MLP, ``down(silu(gate(x)) * up(x))``, with :func:`swiglu`."""
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              mask: str | mx.array) -> mx.array:
    """``softmax(q k^T scale + mask) v`` for ``q [1, H, Lq, D]`` and ``k, v [1, Hkv, Lk, D]``
    (grouped-query: ``H / Hkv`` query heads per key head); ``mask`` "causal" (the last ``Lq``
    of ``Lk`` positions) or boolean ``[Lq, Lk]`` (True: may attend). ``mx.fast``'s kernel where
    :func:`enabled` is off; otherwise the same product with :func:`softmax`."""
    if not enabled():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    _, heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    groups = (q * scale).reshape(kv_heads, heads // kv_heads, lq, dim)
    scores = groups @ k.reshape(kv_heads, 1, lk, dim).swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = (mx.arange(lq)[:, None] + (lk - lq)) >= mx.arange(lk)[None]
    probs = softmax(mx.where(mask, scores, -mx.inf), axis=-1)
    return (probs @ v.reshape(kv_heads, 1, lk, dim)).reshape(1, heads, lq, dim)
