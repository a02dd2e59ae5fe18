"""Per-token log-probs from an mlx-lm model without materialising ``[B, T, V]`` float32 logits.

The decoder runs once to final hidden states ``h [B, T, H]``; then, ``chunk_size`` tokens at a
time, ``log p(t) = (h W^T)[t] - logsumexp(h W^T)`` in float32 under ``mx.checkpoint``, so both
the forward and the backward pass hold one chunk of logits at a time.

Packed rows need a block-diagonal causal mask. mlx-lm's inner models build their own causal
mask, so for packing we run the blocks ourselves (embed -> blocks(mask) -> norm): valid for the
families listed in ``PACKABLE`` whose inner model is exactly that.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from .model import lm_head_module

PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "internlm3"}


def hidden_states(model: nn.Module, input_ids: mx.array, allowed: np.ndarray | None) -> mx.array:
    inner = model.model
    if allowed is None:
        return inner(input_ids)
    model_type = getattr(model, "model_type", None) or getattr(model.args, "model_type", "")
    if model_type not in PACKABLE:
        raise ValueError(f"--packing on MLX supports model types {', '.join(sorted(PACKABLE))}; "
                         f"this model is {model_type!r} (use padding: drop --packing)")
    h = inner.embed_tokens(input_ids)
    mask = mx.array(allowed)[:, None]  # [B, 1, T, T] boolean, True = may attend
    for layer in inner.layers:
        h = layer(h, mask, cache=None)
    return inner.norm(h)


def chunked_token_logps(model: nn.Module, hidden: mx.array, targets: mx.array,
                        chunk_size: int, temperature: float = 1.0) -> mx.array:
    """``log softmax(h W^T / temperature)[target]`` per position, float32 ``[B, T]``."""
    head, method = lm_head_module(model)
    b, t, d = hidden.shape
    flat_h = hidden.reshape(b * t, d)
    flat_t = targets.reshape(b * t)

    def chunk_logps(params, h, tgt):
        head.update(params)
        logits = getattr(head, method)(h).astype(mx.float32)
        if temperature != 1.0:
            logits = logits / temperature
        picked = mx.take_along_axis(logits, mx.stop_gradient(tgt)[:, None], axis=-1)[:, 0]
        return picked - mx.logsumexp(logits, axis=-1)

    checkpointed = mx.checkpoint(chunk_logps)
    params = head.trainable_parameters()
    pieces = [checkpointed(params, flat_h[i:i + chunk_size], flat_t[i:i + chunk_size])
              for i in range(0, b * t, chunk_size)]
    return mx.concatenate(pieces).reshape(b, t)


def _chunked_statistic(model: nn.Module, hidden: mx.array, chunk_size: int,
                       statistic) -> mx.array:
    """``statistic(float32 logits [N, V]) -> [N]`` at every position, chunk by chunk, no grad."""
    head, method = lm_head_module(model)
    b, t, d = hidden.shape
    flat = mx.stop_gradient(hidden).reshape(b * t, d)
    pieces = []
    for i in range(0, b * t, chunk_size):
        pieces.append(statistic(getattr(head, method)(flat[i:i + chunk_size]).astype(mx.float32)))
        mx.eval(pieces[-1])  # one chunk of logits alive at a time
    return mx.concatenate(pieces).reshape(b, t)


def chunked_log_sum_sq(model: nn.Module, hidden: mx.array, chunk_size: int) -> mx.array:
    """``log sum_v p_v^2`` per position (WPO's normaliser), chunk by chunk, no gradient:
    ``logsumexp(2 z) - 2 logsumexp(z)`` for the logits ``z``."""
    return _chunked_statistic(
        model, hidden, chunk_size,
        lambda z: mx.logsumexp(2 * z, axis=-1) - 2 * mx.logsumexp(z, axis=-1))


def chunked_entropy(model: nn.Module, hidden: mx.array, chunk_size: int,
                    temperature: float = 1.0) -> mx.array:
    """Entropy of ``softmax(z / T)`` per position, no gradient:
    ``H = logsumexp(z') - sum_v softmax(z')_v z'_v`` with ``z' = z / T``."""

    def entropy(z: mx.array) -> mx.array:
        z = z / temperature
        return mx.logsumexp(z, axis=-1) - (mx.softmax(z, axis=-1) * z).sum(axis=-1)

    return _chunked_statistic(model, hidden, chunk_size, entropy)


def reference_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """Plain ``log_softmax(logits)[targets]`` from full logits (tests only)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)
