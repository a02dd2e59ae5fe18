"""Float32 reductions over long axes that stay within ~1e-6 of float64: blocked sums.

MLX's float32 ``sum`` over a long axis accumulates in long runs, so its rounding error grows with
the length: over a 49k vocabulary ``mx.logsumexp`` is off by up to ~2e-4 (measured against
float64), which is why MLX loss curves drifted to 2e-4 from TRL's while torch's stayed at 1e-6.
Summing blocks of ``BLOCK`` elements first, then the block sums (recursively, until one block
is left) bounds the error by about ``(BLOCK + n / BLOCK) * eps`` instead of ``n * eps``: ~2e-6
on the same logits. The cost is one reshape and a second, short reduction (measured in
``benchmarks/RESULTS.md``'s terms: a few percent of a log-prob chunk on SmolLM2's vocabulary).

- :func:`blocked_sum` is ``x.sum(axis)``, precisely;
- :func:`logsumexp` is ``log sum exp(x)`` along ``axis`` with the max shifted out (differentiable:
  its gradient is the softmax, as ``mx.logsumexp``'s; the ``exp`` is :func:`mlx_ft.fastmath.exp`);
- :func:`global_norm` is the L2 norm of a list of arrays (the logged grad norm and clipping).
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from . import fastmath

BLOCK = 256


def blocked_sum(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """``x.sum(axis, keepdims)`` computed as a sum of ``BLOCK``-element partial sums."""
    axis = axis % x.ndim
    if axis != x.ndim - 1:
        x = mx.moveaxis(x, axis, -1)
    total = _sum_last(x)
    return mx.expand_dims(total, axis) if keepdims else total


def _sum_last(x: mx.array) -> mx.array:
    n = x.shape[-1]
    if n <= BLOCK:
        return x.sum(axis=-1)
    full = n - n % BLOCK
    blocks = x[..., :full].reshape(*x.shape[:-1], full // BLOCK, BLOCK).sum(axis=-1)
    total = _sum_last(blocks)
    return total + x[..., full:].sum(axis=-1) if full < n else total


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """``log(sum(exp(x), axis))`` with the row max shifted out and a blocked sum (the native
    kernel's float64 sum where :mod:`mlx_ft.native` is in use)."""
    moved = x if axis in (-1, x.ndim - 1) else mx.moveaxis(x, axis, -1)
    native = fastmath.native_logsumexp(moved)
    if native is not None:
        return mx.expand_dims(native, axis) if keepdims else native
    m = mx.stop_gradient(x.max(axis=axis, keepdims=True))
    m = mx.where(mx.isinf(m), 0.0, m)  # an all -inf row gives -inf, not nan
    out = mx.log(blocked_sum(fastmath.exp(x - m), axis, keepdims=True)) + m
    return out if keepdims else out.squeeze(axis)


def global_norm(arrays: Iterable[mx.array]) -> mx.array:
    """``sqrt(sum_i ||a_i||^2)`` in float32 with blocked sums over each flattened array."""
    squares = [blocked_sum(mx.square(a.astype(mx.float32)).reshape(-1)) for a in arrays]
    return mx.sqrt(blocked_sum(mx.stack(squares))) if squares else mx.array(0.0)
