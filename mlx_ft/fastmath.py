"""``exp``, softmax, attention and SwiGLU for MLX on a CPU, where ``mx.exp`` is slow.

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

On a GPU (Metal, CUDA), or with ``POSTTRAIN_MLX_FAST_EXP=0``, every function here is the plain
MLX one.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx import nn

LOG2E = 1.4426950408889634


def enabled() -> bool:
    """Whether the ``powf``-based ``exp`` is used: on a CPU device, unless switched off."""
    return (mx.default_device().type == mx.DeviceType.cpu
            and os.environ.get("POSTTRAIN_MLX_FAST_EXP", "1") != "0")


def _pow2(x: mx.array) -> mx.array:
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


def exp_values(x: mx.array) -> mx.array:
    """``e^x`` where no gradient is taken (inside a custom backward): plain ops, so nothing
    keeps ``x`` alive for a backward that never comes."""
    return _pow2(x) if enabled() else mx.exp(x)


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    e = _pow2(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


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
    """``q [B, G, R, L, D]`` (already scaled; ``R`` query heads per key head), ``k, v
    [B, G, 1, S, D]``, ``mask [L, S]``."""
    return softmax(q @ k.swapaxes(-1, -2) + mask) @ v


@_attention.vjp
def _attention_vjp(primals, cotangent, output):
    # The probabilities are recomputed (one more q k^T and exp): only q, k, v and the output
    # stay alive between the passes, never a [L, S] array per head.
    q, k, v, mask = primals
    p = softmax(q @ k.swapaxes(-1, -2) + mask)
    dp = cotangent @ v.swapaxes(-1, -2)
    ds = p * (dp - (cotangent * output).sum(axis=-1, keepdims=True))  # sum_j p dp = do . o
    dk = (ds.swapaxes(-1, -2) @ q).sum(axis=2, keepdims=True)
    dv = (p.swapaxes(-1, -2) @ cotangent).sum(axis=2, keepdims=True)
    return ds @ k, dk, dv, mx.zeros_like(mask)


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
    out = _attention((q * scale).reshape(b, hkv, hq // hkv, length, d), k[:, :, None],
                     v[:, :, None], mask.astype(q.dtype))
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
    return _swiglu_from(gate, up, _pow2(-gate))


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals  # the sigmoid is recomputed from the inputs: one exp per element
    return _swiglu_grads_from(cotangent, gate, up, _pow2(-gate))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``; its backward keeps the inputs only and recomputes the sigmoid."""
    if not enabled():
        return gate * mx.sigmoid(gate) * up
    return _swiglu(gate, up)


def swiglu_mlp(mlp: nn.Module, x: mx.array) -> mx.array:
    """A llama-family MLP, ``down(silu(gate(x)) * up(x))``, with :func:`swiglu`."""
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
