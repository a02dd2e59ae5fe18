"""``exp``, softmax, attention and SwiGLU for MLX on a CPU, where ``mx.exp`` is slow.

Three tiers, the first available one used on a CPU device:

1. the fused kernels of :mod:`mlx_ft.native` (C++ built on this machine): one vectorised pass
   per chain, ``exp`` at ~0.6 ns per element and max relative error ~1e-7 against float64
   (better than ``mx.exp``), row sums accumulated in float64;
2. ``exp`` through ``powf`` as plain MLX ops (below), when the kernels are unavailable or
   ``POSTTRAIN_MLX_NATIVE=0``;
3. MLX's own functions: on a GPU, or with ``POSTTRAIN_MLX_FAST_EXP=0`` (which also turns 1 off).

MLX 0.32's CPU ``exp`` costs ~14-17 ns per float32 element (its scalar polynomial calls
libm's ``fmaf`` per term), ``mx.sigmoid`` and ``mx.softmax`` as much; ``mx.power(2, y)`` (one
libm ``powf`` per element) costs ~4.5 ns. So here

    exp(x) = 2 ** (x * log2(e))

two elementwise ops, ~3x faster than ``mx.exp`` and with its error profile (measured against
float64 over [-87, 88]: the same max relative error, ~4e-6 at the ends of the range, ~3e-7
within [-5, 5]: the rounding of ``x * log2(e)`` dominates in both). Plain ops on purpose: inside
``mx.value_and_grad`` an ``mx.compile``-d function is traced like an uncompiled one, so a
fused kernel (a polynomial ``exp`` compiled into one loop) never reaches a training step.

- :func:`exp` (gradient: its value);
- :func:`softmax` over the last axis, the max shifted out, with the backward
  ``p * (g - sum(g p))`` from the saved output (no second ``exp``);
- :func:`attention`: ``softmax(q k^T * scale + mask) v`` for grouped-query heads, the CPU
  replacement of ``mx.fast.scaled_dot_product_attention`` (whose CPU fallback runs MLX's
  softmax and masks with a select, and keeps the probabilities for the backward): the backward
  recomputes them, so no ``[L, S]`` array per head outlives the forward; :func:`attention_mask`
  builds the additive ``0 / -inf`` mask once per span, for every layer;
- :func:`swiglu` ``silu(gate) * up`` with a backward that keeps its inputs only (the sigmoid is
  recomputed: one ``exp`` per element), where MLX's own keeps its intermediates: ~0.24 GB less
  MLX peak on an SFT batch of 700 tokens of SmolLM2; :func:`swiglu_mlp`, a llama-family MLP
  with it (the padding-free forward's).

The gradients are the same formulas in every tier (custom VJPs below); the tiers agree to
float32 rounding (tests/test_fastmath_mlx.py).
"""

from __future__ import annotations

import functools
import math
import os

import mlx.core as mx
from mlx import nn

LOG2E = 1.4426950408889634


def enabled() -> bool:
    """Whether the ``powf``-based ``exp`` is used: on a CPU device, unless switched off."""
    return (mx.default_device().type == mx.DeviceType.cpu
            and os.environ.get("POSTTRAIN_MLX_FAST_EXP", "1") != "0")


def _native():
    """The :mod:`mlx_ft.native` kernels when the fast path is on and they load, else None."""
    if not enabled():
        return None
    from . import native

    return native.kernels()


def _pow2(x: mx.array) -> mx.array:
    """``e^x`` as plain ops: the native kernel, else ``2 ** (x log2 e)`` (one ``powf``)."""
    kernels = _native()
    if kernels is not None:
        return kernels.exp(x).astype(x.dtype)
    return mx.power(2.0, x * LOG2E).astype(x.dtype)


@mx.custom_function
def _pow2_exp(x: mx.array) -> mx.array:
    return _pow2(x)


@_pow2_exp.vjp
def _pow2_exp_vjp(primals, cotangent, output):
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """``e^x``, elementwise (module docstring)."""
    return _pow2_exp(x) if enabled() else mx.exp(x)


def _softmax_values(x: mx.array, bias: mx.array | None = None) -> mx.array:
    """``softmax(x + bias)`` over the last axis, no gradient of its own: ``bias [L, S]``, row
    ``r`` of ``x [..., R * L, S]`` adds bias row ``r mod L``."""
    kernels = _native()
    if kernels is not None:
        return kernels.softmax(x, bias).astype(x.dtype)
    if bias is not None:
        x = (x.reshape(*x.shape[:-2], -1, *bias.shape) + bias).reshape(x.shape)
    e = _pow2(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_grad(p: mx.array, dp: mx.array) -> mx.array:
    """``p (dp - sum(p dp))`` over the last axis: the gradient of a softmax with output ``p``."""
    kernels = _native()
    if kernels is not None:
        return kernels.softmax_grad(p, dp).astype(p.dtype)
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    return _softmax_values(x)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return _softmax_grad(output, cotangent)


def softmax(x: mx.array) -> mx.array:
    """``softmax(x)`` over the last axis; ``-inf`` entries get probability 0 (a row needs one
    finite entry, as with MLX's own)."""
    return _softmax(x) if enabled() else mx.softmax(x, axis=-1, precise=True)


def causal_bias(length: int, before: int = 0) -> mx.array:
    """``[length, before + length]`` additive mask: ``before`` keys every query sees, then the
    query's own span causally (0 where allowed, ``-inf`` elsewhere)."""
    i = mx.arange(length)[:, None] + before
    return mx.where(mx.arange(before + length)[None] <= i, 0.0, -mx.inf).astype(mx.float32)


def attention_mask(length: int, before: int = 0) -> mx.array | str:
    """The mask :func:`attention` takes for a span of ``length`` queries that sees ``before``
    keys, then itself causally; built once per forward and shared by every layer."""
    if not enabled():
        return "causal" if before == 0 else mx.concatenate(
            [mx.ones((length, before), dtype=mx.bool_),
             mx.arange(length)[None] <= mx.arange(length)[:, None]], axis=1)
    return causal_bias(length, before)


@mx.custom_function
def _attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array) -> mx.array:
    """``q [B, G, R * L, D]`` (already scaled; the ``R`` query heads that read key head ``g``
    stacked along the rows, so each (batch, key head) is one matrix product), ``k, v [B, G,
    S, D]``, ``mask [L, S]`` (row ``r`` of the scores uses mask row ``r mod L``)."""
    return _softmax_values(q @ k.swapaxes(-1, -2), mask) @ v


@_attention.vjp
def _attention_vjp(primals, cotangent, output):
    # The probabilities are recomputed (one more q k^T and exp): only q, k, v and the output
    # stay alive between the passes, never a [L, S] array per head. The stacked rows make
    # dk and dv sum over the R query heads inside their matrix products.
    q, k, v, mask = primals
    p = _softmax_values(q @ k.swapaxes(-1, -2), mask)
    ds = _softmax_grad(p, cotangent @ v.swapaxes(-1, -2))
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ cotangent, mx.zeros_like(mask)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
              mask: mx.array | str) -> mx.array:
    """``softmax(q k^T * scale + mask) v`` for ``q [B, Hq, L, D]``, ``k, v [B, Hkv, S, D]``
    (query head ``h`` reads key head ``h // (Hq / Hkv)``) and an additive ``mask [L, S]`` from
    :func:`attention_mask`; the backward recomputes the probabilities instead of keeping them.
    With the fast path off, MLX's ``scaled_dot_product_attention`` (``mask`` is then
    ``"causal"`` or boolean)."""
    if not enabled() or isinstance(mask, str) or mask.dtype == mx.bool_:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    out = _attention((q * scale).reshape(b, hkv, hq // hkv * length, d), k, v,
                     mask.astype(q.dtype))
    return out.reshape(b, hq, length, d)


def _swiglu_from(gate: mx.array, up: mx.array, e: mx.array) -> mx.array:
    return gate * up / (1.0 + e)  # e = exp(-gate)


def _swiglu_grads_from(cotangent: mx.array, gate: mx.array, up: mx.array,
                       e: mx.array) -> tuple[mx.array, mx.array]:
    # silu'(g) = s (1 + g (1 - s)), s = sigmoid(g) = 1 / (1 + e)
    s = 1.0 / (1.0 + e)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    kernels = _native()
    if kernels is not None:
        return kernels.swiglu(gate, up).astype(gate.dtype)
    return _swiglu_from(gate, up, _pow2(-gate))


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals  # the sigmoid is recomputed from the inputs: one exp per element
    kernels = _native()
    if kernels is not None:
        return tuple(g.astype(gate.dtype) for g in kernels.swiglu_grad(cotangent, gate, up))
    return _swiglu_grads_from(cotangent, gate, up, _pow2(-gate))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``; its backward keeps the inputs only and recomputes the sigmoid."""
    if not enabled():
        return gate * mx.sigmoid(gate) * up
    return _swiglu(gate, up)


def swiglu_mlp(mlp: nn.Module, x: mx.array) -> mx.array:
    """A llama-family MLP, ``down(silu(gate(x)) * up(x))``, with :func:`swiglu`."""
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def exp_shift_sum(z: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``(e, m, s)`` for float32 ``z [n, V]``: ``m = max z`` per row (0 for an all ``-inf``
    row), ``e = exp(z - m)``, ``s = sum e`` (``m, s`` as ``[n, 1]``), no gradient: the fused
    head's pass over its logits. Native: one kernel, the sum in float64; else the max, ``exp``
    and a blocked sum (:mod:`mlx_ft.precise`) as separate ops."""
    kernels = _native()
    if kernels is not None:
        e, m, s = kernels.exp_shift_sum(z)
        return e, m[..., None], s[..., None]
    from . import precise

    m = mx.stop_gradient(z.max(axis=-1, keepdims=True))
    m = mx.where(mx.isinf(m), 0.0, m)
    e = _pow2(z - m) if enabled() else mx.exp(z - m)
    return e, m, precise.blocked_sum(e, axis=-1, keepdims=True)


@mx.custom_function
def _logsumexp(x: mx.array) -> mx.array:
    _, m, s = _native().exp_shift_sum(x)
    return mx.log(s) + m


@_logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    # one input: primals is x itself. Recomputed: nothing [..., V] is kept for the backward.
    e, _, s = _native().exp_shift_sum(primals)
    return (cotangent / s)[..., None] * e


def native_logsumexp(x: mx.array) -> mx.array | None:
    """``log sum exp(x)`` over the last axis of float32 ``x`` with the native kernel (the same
    ``m + log s`` the fused head computes, the sum in float64; gradient: the softmax); None
    when the kernels are not in use."""
    if x.dtype != mx.float32 or _native() is None:
        return None
    return _logsumexp(x)


@functools.cache
def _rms_norm_fn(eps: float):
    @mx.custom_function
    def norm(x: mx.array, weight: mx.array) -> mx.array:
        return _native().rms_norm(x, weight, eps)

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight = primals
        dx, dw = _native().rms_norm_grad(x, weight, cotangent, eps)
        return dx, dw.astype(weight.dtype)

    return norm


def rms_norm(norm: nn.Module, x: mx.array) -> mx.array:
    """``norm(x)`` for an ``nn.RMSNorm`` (``x r w``, ``r = 1 / sqrt(mean(x^2) + eps)``) with
    the native kernels on float32 inputs (one pass forward, one backward, weight gradient
    included); any other norm, dtype or tier: the module itself."""
    if type(norm) is not nn.RMSNorm or x.dtype != mx.float32 or _native() is None:
        return norm(x)
    return _rms_norm_fn(norm.eps)(x, norm.weight)


def rotary_tables(rope: nn.Module, positions) -> tuple | None:
    """``(cos, sin, traditional)`` of an ``nn.RoPE`` at integer ``positions [N]`` (one per
    token), ``cos, sin [N, dims / 2]``, for :func:`rotary` (which needs ``dims`` = the head
    dimension); None when the kernels are off or the rotary embedding is not a plain
    ``nn.RoPE`` (the caller then applies ``rope`` itself). The angles are MLX's:
    ``theta = (position * scale) * base^(-i / (dims / 2))``, in float32."""
    if type(rope) is not nn.RoPE or _native() is None:
        return None
    half = rope.dims // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32)
                       * mx.array(math.log(rope.base) / half, dtype=mx.float32))
    theta = (mx.array(positions, dtype=mx.float32) * rope.scale)[:, None] * inv_freqs[None]
    return mx.cos(theta), mx.sin(theta), bool(rope.traditional)


def rotary(x: mx.array, tables: tuple) -> mx.array:
    """Rotary embedding of ``x [N, H, D]`` (float32) at the angles of :func:`rotary_tables`;
    its gradient is the inverse rotation (the same kernel with ``-sin``)."""
    cos, sin, traditional = tables
    return _rotary_fn(traditional)(x, cos, sin)


@functools.cache
def _rotary_fn(traditional: bool):
    @mx.custom_function
    def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        return _native().rope(x, cos, sin, traditional).astype(x.dtype)

    @rotate.vjp
    def rotate_vjp(primals, cotangent, output):
        x, cos, sin = primals
        return (_native().rope(cotangent, cos, -sin, traditional).astype(x.dtype),
                mx.zeros_like(cos), mx.zeros_like(sin))

    return rotate
