"""Per-token log-probs from an mlx-lm model without materialising ``[B, T, V]`` float32 logits.

The decoder runs once to final hidden states ``h [B, T, H]``; then, ``chunk_size`` tokens at a
time, ``log p(t) = (h W^T)[t] - logsumexp(h W^T)`` in float32 under ``mx.checkpoint``, so both
the forward and the backward pass hold one chunk of logits at a time.

Packed rows need a block-diagonal causal mask. mlx-lm's inner models build their own causal
mask, so for packing we run the blocks ourselves (embed -> blocks(mask) -> norm): valid for the
families listed in ``PACKABLE`` whose inner model is exactly that.

Training fast path (:func:`token_logps`, used by the backend; the same numbers up to float
rounding):

- padding-free: the families of :mod:`mlx_ft.varlen` run only the real tokens of the batch
  (documents end to end, attention per document), optionally split over CPU streams;
- fused head: when the output projection is frozen (LoRA / DoRA), :func:`fused_token_logps`
  computes each chunk's log-probs AND their gradient w.r.t. the hidden states in one pass over
  the chunk's logits (one ``exp`` per logit, no recomputation in backward; the backward is a
  scale of the saved ``[N, H]`` gradient).

Each can be switched off to measure it: ``POSTTRAIN_MLX_VARLEN=0``, ``POSTTRAIN_MLX_FUSED_HEAD=0``;
``POSTTRAIN_MLX_STREAMS=2`` splits the documents over two CPU streams (off by default).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from . import precise, varlen
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
        return picked - precise.logsumexp(logits, axis=-1)

    checkpointed = mx.checkpoint(chunk_logps)
    params = head.trainable_parameters()
    pieces = [checkpointed(params, flat_h[i:i + chunk_size], flat_t[i:i + chunk_size])
              for i in range(0, b * t, chunk_size)]
    return mx.concatenate(pieces).reshape(b, t)


def _frozen_head_weight(model: nn.Module) -> mx.array | None:
    """The dense ``[V, H]`` output weight when the head is frozen and unquantised, else None."""
    head, _ = lm_head_module(model)
    if os.environ.get("POSTTRAIN_MLX_FUSED_HEAD", "1") == "0" \
            or type(head) not in (nn.Linear, nn.Embedding) or "bias" in head \
            or tree_flatten(head.trainable_parameters()):
        return None
    return head.weight


_exp_shifted = mx.compile(lambda z, m: mx.exp(z - m), shapeless=True)


def fused_token_logps(weight: mx.array, hidden: mx.array, targets: mx.array, chunk_size: int,
                      temperature: float = 1.0) -> mx.array:
    """``log softmax(h W^T / T)[target]`` for ``hidden [N, H]`` with a FROZEN ``weight [V, H]``.

    Per chunk of logits ``z = h W^T / T``: ``m = max z``, ``e = exp(z - m)``, ``s = sum e``;
    ``log p = z[t] - m - log s`` and, in the same pass, ``d log p / d h = (W[t] - (e W) / s) / T``.
    The backward multiplies that saved ``[N, H]`` gradient by the incoming cotangent: the
    ``[chunk, V]`` logits are never kept nor recomputed. No gradient reaches ``weight``.
    """

    @mx.custom_function
    def chunk(h: mx.array, tgt: mx.array):
        z = (h @ weight.T).astype(mx.float32)
        if temperature != 1.0:
            z = z / temperature
        m = mx.stop_gradient(z.max(axis=-1, keepdims=True))
        e = _exp_shifted(z, m)
        s = precise.blocked_sum(e, axis=-1, keepdims=True)
        logp = mx.take_along_axis(z, tgt[:, None], axis=-1)[:, 0] - m[:, 0] - mx.log(s[:, 0])
        grad = (weight[tgt].astype(mx.float32) - (e.astype(weight.dtype) @ weight) / s)
        if temperature != 1.0:
            grad = grad / temperature
        return logp, grad.astype(h.dtype)

    @chunk.vjp
    def chunk_vjp(primals, cotangents, outputs):
        return cotangents[0][:, None].astype(outputs[1].dtype) * outputs[1], \
            mx.zeros_like(primals[1])

    # Two [chunk, V] float32 arrays live at once (logits and their exponentials): half-size
    # chunks keep the memory bound of one ``chunk_size`` block of logits.
    step = max(1, chunk_size // 2)
    pieces = [chunk(hidden[i:i + step], targets[i:i + step])[0]
              for i in range(0, hidden.shape[0], step)]
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)


_STREAMS: list = []


def cpu_streams() -> list:
    """The MLX streams the padding-free path spreads documents over: the default stream, or on
    a CPU ``POSTTRAIN_MLX_STREAMS`` of them (each its own thread; the OpenBLAS loaded by
    ``mlx_ft.blas`` then gets cores / streams threads). Off by default: with MLX 0.32 on a
    2-core x86 the two halves of a model step barely overlap, and one stream with a 2-thread
    BLAS was faster (benchmarks/RESULTS.md)."""
    if not _STREAMS:
        _STREAMS.append(mx.default_stream(mx.default_device()))
        wanted = int(os.environ.get("POSTTRAIN_MLX_STREAMS", "1"))
        if wanted > 1 and mx.default_device().type == mx.DeviceType.cpu:
            _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(wanted - 1))
            _set_blas_threads(max(1, (os.cpu_count() or 1) // len(_STREAMS)))
    return _STREAMS


def _set_blas_threads(n: int) -> None:
    import ctypes

    from . import blas

    if blas.loaded_from:
        ctypes.CDLL(blas.loaded_from).openblas_set_num_threads(n)


def token_logps(model: nn.Module, batch: dict, host: dict, chunk_size: int,
                temperature: float = 1.0, train: bool = False) -> mx.array:
    """Per-token log-probs ``[B, T]`` of ``batch["targets"]`` (zeros at padding on the fast
    path). ``host`` holds the numpy batch; ``train`` allows the fused head (gradients follow)."""
    weight = _frozen_head_weight(model) if train else None
    if not varlen.supported(model):
        h = hidden_states(model, batch["input_ids"], batch["_allowed"])
        if weight is None:
            return chunked_token_logps(model, h, batch["targets"], chunk_size, temperature)
        b, t, d = h.shape
        return fused_token_logps(weight, h.reshape(b * t, d), batch["targets"].reshape(b * t),
                                 chunk_size, temperature).reshape(b, t)
    docs = varlen.documents(host["segment_ids"])
    groups = varlen.split_groups(docs, len(cpu_streams()))
    ordered, values = [], []
    for stream, group in zip(cpu_streams(), groups):
        with mx.stream(stream):
            h = varlen.hidden_states(model, host["input_ids"], group)
            tgt = varlen.gather_targets(host["targets"], group)
            if weight is None:
                logps = chunked_token_logps(model, h[None], tgt[None], chunk_size,
                                            temperature)[0]
            else:
                logps = fused_token_logps(weight, h, tgt, chunk_size, temperature)
        at = 0
        for doc in group:
            ordered.append(doc)
            values.append(logps[at:at + doc.length])
            at += doc.length
    return varlen.scatter_rows(tuple(host["input_ids"].shape), ordered, values)


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
        lambda z: precise.logsumexp(2 * z, axis=-1) - 2 * precise.logsumexp(z, axis=-1))


def chunked_entropy(model: nn.Module, hidden: mx.array, chunk_size: int,
                    temperature: float = 1.0) -> mx.array:
    """Entropy of ``softmax(z / T)`` per position, no gradient:
    ``H = logsumexp(z') - sum_v softmax(z')_v z'_v`` with ``z' = z / T``."""

    def entropy(z: mx.array) -> mx.array:
        z = z / temperature
        return precise.logsumexp(z, axis=-1) - precise.blocked_sum(mx.softmax(z, axis=-1) * z)

    return _chunked_statistic(model, hidden, chunk_size, entropy)


def reference_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """Plain ``log_softmax(logits)[targets]`` from full logits (tests only)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - precise.logsumexp(logits, axis=-1)
