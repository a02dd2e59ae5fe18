"""SwiGLU for MLX on a CPU, where ``mx.exp`` is slow.

MLX 0.32's CPU ``exp`` costs ~15-19 ns per float32 element (1.08M elements: 17-20 ms, against
0.4 ms for an add, on the 2-core x86 box of ``benchmarks/RESULTS.md``), while a compiled chain of
ten multiply-adds over the same array takes 0.7 ms. In the padding-free forward that is the
sigmoid of every SwiGLU activation ([tokens, intermediate] per block).

Here ``exp(x) = 2^k exp(r)`` with ``k = round(x / ln 2)`` and ``r = x - k ln 2`` (ln 2 split in a
high and a low part, so ``r`` is exact to float32), ``|r| <= ln(2) / 2``, ``exp(r)`` by its
Taylor polynomial of degree 7 (truncation error ``r^8 / 8! < 6e-9``, below float32's 6e-8
rounding) and ``2^k`` written into the exponent bits: one compiled elementwise kernel for the
reduction and the polynomial, one multiply by the bit-cast ``2^k``. Max relative error ~1e-7
(``mx.exp``'s own: ~8e-7). Below ``LOW`` the result is 0 (``exp(-inf) = 0``), above ``HIGH``
``inf``; NaN stays NaN.

:func:`swiglu` is built on it, with a custom backward that keeps its inputs only (the sigmoid
is recomputed: one exponential per element), where MLX's compiled SwiGLU keeps its
intermediates too: ~0.24 GB less MLX peak on an SFT batch of 700 tokens of SmolLM2;
:func:`swiglu_mlp` is a llama-family MLP with it (the padding-free forward's). On a GPU
(Metal, CUDA), or with ``POSTTRAIN_MLX_FAST_EXP=0``, every function here is the plain MLX one.
(An attention softmax on the same exp measured no faster in a whole step and moved MLX's
numbers further from torch's: not used.)
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
    compiled kernel; the bit view stays outside it. Compiled per shape (a new shape traces in
    ~0.4 ms): MLX 0.32's shape-free compilation of it failed to broadcast inside the gradient
    of a step that runs two models (GKD's student and teacher)."""
    a = mx.clip(x, LOW, HIGH)
    k = mx.floor(a * LOG2E + 0.5)
    r = a - k * LN2_HI - k * LN2_LO
    q = 1.0 + r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (
        1 / 120 + r * (1 / 720 + r * (1 / 5040)))))))
    q = mx.where(x < LOW, 0.0, mx.where(x > HIGH, mx.inf, q))
    q = mx.where(k > 127, q * 2.0, q)  # 2^128 is not a float32: 2 * 2^127
    return q, (mx.minimum(k, 127).astype(mx.int32) + 127) << 23


_reduce_compiled = mx.compile(_reduce)


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


def _swiglu_from(gate: mx.array, up: mx.array, e: mx.array) -> mx.array:
    return gate * up / (1.0 + e)  # e = exp(-gate)


def _swiglu_grads_from(cotangent: mx.array, gate: mx.array, up: mx.array,
                       e: mx.array) -> tuple[mx.array, mx.array]:
    # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) = 1 / (1 + e)
    s = 1.0 / (1.0 + e)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


_swiglu_compiled = mx.compile(_swiglu_from)
_swiglu_grads = mx.compile(_swiglu_grads_from)


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
