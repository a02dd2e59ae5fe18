"""Per-token outputs of an mlx-lm model without materialising ``[B, T, V]`` float32 logits.

The decoder runs once to final hidden states ``h``; then, ``chunk_size`` tokens at a time, the
float32 logits ``z = h W^T / T`` give every statistic a loss asked for (``HEAD_OUTPUTS``:
``logps = z[t] - lse(z)``, ``entropy = -sum p log p``, ``log_sum_sq = log sum p^2``), and a
value head gives ``values`` (:func:`model_outputs`). With a gradient, each chunk runs under
``mx.checkpoint``, so the forward and the backward pass hold one chunk of logits at a time.

Packed rows need a block-diagonal causal mask. mlx-lm's inner models build their own causal
mask, so for packing we run the blocks ourselves (embed -> blocks(mask) -> norm): valid for the
families listed in ``PACKABLE`` whose inner model is exactly that.

Training fast paths (the same numbers up to float rounding):

- padding-free: the families of :mod:`mlx_ft.varlen` run only the real tokens of the batch
  (documents end to end, attention per document), optionally split over CPU streams;
- fused head: when the output projection is frozen (LoRA / DoRA) and only ``logps`` needs a
  gradient, :func:`_fused_outputs` computes each chunk's log-probs AND their gradient w.r.t.
  the hidden states in one pass over the chunk's logits (one ``exp`` per logit, no
  recomputation in backward; the backward is a scale of the saved ``[N, H]`` gradient); the
  entropy and log sum p^2, when asked, come out of the same pass, detached.

Each can be switched off to measure it: ``POSTTRAIN_MLX_VARLEN=0``, ``POSTTRAIN_MLX_FUSED_HEAD=0``;
``POSTTRAIN_MLX_STREAMS=2`` splits the documents over two CPU streams (off by default).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from algorithms.backend import HEAD_MASK, head_rows

from . import fastmath, precise, varlen
from .model import lm_head_module

# selected_head_outputs: up to this share of positions not read by the loss, the head runs on
# every position (and zeroes the others) instead of gathering the read ones.
DENSE_SKIPPED = 0.05

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


HEAD_OUTPUTS = ("logps", "entropy", "log_sum_sq")


def _statistics(z: mx.array, targets: mx.array, names: tuple[str, ...]) -> list[mx.array]:
    """The ``names`` statistics of float32 logits ``z [n, V]`` (already divided by T):
    ``z[t] - lse(z)``, ``-sum p log p``, ``log sum p^2``."""
    lse = precise.logsumexp(z, axis=-1)
    logp = z - lse[:, None] if ("entropy" in names or "log_sum_sq" in names) else None
    out = []
    for name in names:
        if name == "logps":
            out.append(mx.take_along_axis(z, mx.stop_gradient(targets)[:, None], axis=-1)[:, 0]
                       - lse)
        elif name == "entropy":
            out.append(-precise.blocked_sum(fastmath.exp(logp) * logp, axis=-1))
        else:  # log_sum_sq
            out.append(precise.logsumexp(2 * logp, axis=-1))
    return out


def _checkpointed_outputs(model: nn.Module, hidden: mx.array, targets: mx.array,
                          chunk_size: int, temperature: float,
                          names: tuple[str, ...]) -> list[list[mx.array]]:
    """Per chunk, the statistics under ``mx.checkpoint``: gradients reach the hidden states
    and a trainable head; each chunk's logits are recomputed in backward, never kept."""
    head, method = lm_head_module(model)

    def chunk(params, h, tgt):
        head.update(params)
        z = getattr(head, method)(h).astype(mx.float32)
        if temperature != 1.0:
            z = z / temperature
        return _statistics(z, tgt, names)

    checkpointed = mx.checkpoint(chunk)
    params = head.trainable_parameters()
    return [checkpointed(params, hidden[i:i + chunk_size], targets[i:i + chunk_size])
            for i in range(0, hidden.shape[0], chunk_size)]


def _plain_outputs(model: nn.Module, hidden: mx.array, targets: mx.array, chunk_size: int,
                   temperature: float, names: tuple[str, ...]) -> list[list[mx.array]]:
    """Per chunk, the statistics without gradient, each chunk evaluated before the next so one
    chunk of logits is alive at a time."""
    head, method = lm_head_module(model)
    hidden = mx.stop_gradient(hidden)
    pieces = []
    for i in range(0, hidden.shape[0], chunk_size):
        z = getattr(head, method)(hidden[i:i + chunk_size]).astype(mx.float32)
        if temperature != 1.0:
            z = z / temperature
        pieces.append(_statistics(z, targets[i:i + chunk_size], names))
        mx.eval(pieces[-1])
    return pieces


def chunked_token_logps(model: nn.Module, hidden: mx.array, targets: mx.array,
                        chunk_size: int, temperature: float = 1.0) -> mx.array:
    """``log softmax(h W^T / temperature)[target]`` per position, float32 ``[B, T]``, with
    gradients (the checkpointed path)."""
    b, t, d = hidden.shape
    pieces = _checkpointed_outputs(model, hidden.reshape(b * t, d), targets.reshape(b * t),
                                   chunk_size, temperature, ("logps",))
    return mx.concatenate([p[0] for p in pieces]).reshape(b, t)


def _frozen_head_weight(model: nn.Module) -> mx.array | None:
    """The dense ``[V, H]`` output weight when the head is frozen and unquantised, else None."""
    head, _ = lm_head_module(model)
    if os.environ.get("POSTTRAIN_MLX_FUSED_HEAD", "1") == "0" \
            or type(head) not in (nn.Linear, nn.Embedding) or "bias" in head \
            or tree_flatten(head.trainable_parameters()):
        return None
    return head.weight


def _fused_outputs(weight: mx.array, hidden: mx.array, targets: mx.array, chunk_size: int,
                   temperature: float, names: tuple[str, ...]) -> list[list[mx.array]]:
    """``log softmax(h W^T / T)[target]`` for ``hidden [N, H]`` with a FROZEN ``weight [V, H]``,
    and (detached) entropy / log sum p^2 from the same pass when ``names`` asks.

    Per chunk of logits ``z = h W^T / T``: ``m = max z``, ``e = exp(z - m)``, ``s = sum e``;
    ``log p = z[t] - m - log s`` and, in the same pass, ``d log p / d h = (W[t] - (e W) / s) / T``.
    The backward multiplies that saved ``[N, H]`` gradient by the incoming cotangent: the
    ``[chunk, V]`` logits are never kept nor recomputed. No gradient reaches ``weight``.
    """
    extra = tuple(n for n in names if n != "logps")

    @mx.custom_function
    def chunk(h: mx.array, tgt: mx.array):
        z = (h @ weight.T).astype(mx.float32)
        if temperature != 1.0:
            z = z / temperature
        e, m, s = fastmath.exp_shift_sum(z)
        log_s = mx.log(s[:, 0])
        lse = log_s + m[:, 0]  # as precise.logsumexp: the no-gradient pass gives the same bits
        logp = mx.take_along_axis(z, tgt[:, None], axis=-1)[:, 0] - lse
        grad = (weight[tgt].astype(mx.float32) - (e.astype(weight.dtype) @ weight) / s)
        if temperature != 1.0:
            grad = grad / temperature
        stats = []
        for name in extra:
            if name == "entropy":  # log s + m - sum(e z) / s
                stats.append(log_s + m[:, 0] - precise.blocked_sum(e * z, axis=-1) / s[:, 0])
            else:  # log sum p^2 = log sum e^2 - 2 log s
                stats.append(mx.log(precise.blocked_sum(mx.square(e), axis=-1)) - 2 * log_s)
        return (logp, grad.astype(h.dtype), *stats)

    @chunk.vjp
    def chunk_vjp(primals, cotangents, outputs):
        return cotangents[0][:, None].astype(outputs[1].dtype) * outputs[1], \
            mx.zeros_like(primals[1])

    # Two [chunk, V] float32 arrays live at once (logits and their exponentials): half-size
    # chunks keep the memory bound of one ``chunk_size`` block of logits.
    step = max(1, chunk_size // 2)
    pieces = []
    for i in range(0, hidden.shape[0], step):
        logp, _, *stats = chunk(hidden[i:i + step], targets[i:i + step])
        by_name = dict(zip(extra, (mx.stop_gradient(x) for x in stats)))
        by_name["logps"] = logp
        pieces.append([by_name[n] for n in names])
    return pieces


def fused_token_logps(weight: mx.array, hidden: mx.array, targets: mx.array, chunk_size: int,
                      temperature: float = 1.0) -> mx.array:
    """Log-probs with gradient through a frozen head (see :func:`_fused_outputs`), ``[N]``."""
    return mx.concatenate([p[0] for p in _fused_outputs(weight, hidden, targets, chunk_size,
                                                         temperature, ("logps",))])


def head_outputs(model: nn.Module, hidden: mx.array, targets: mx.array, chunk_size: int,
                 temperature: float, wanted: dict[str, bool], train: bool) -> dict[str, mx.array]:
    """The ``wanted`` head statistics (name -> with gradient) of ``hidden [N, H]``, float32
    ``[N]``. ``train`` marks the pass whose gradient is taken: then the fused path runs when
    the head is frozen and only ``logps`` needs a gradient, the checkpointed path otherwise."""
    names = tuple(n for n in HEAD_OUTPUTS if n in wanted)
    if not names:
        return {}
    grad_on = train and any(wanted[n] for n in names)
    weight = _frozen_head_weight(model) if grad_on else None
    if weight is not None and "logps" in names and not any(
            wanted[n] for n in names if n != "logps"):
        pieces = _fused_outputs(weight, hidden, targets, chunk_size, temperature, names)
    elif grad_on:
        pieces = _checkpointed_outputs(model, hidden, targets, chunk_size, temperature, names)
    else:
        pieces = _plain_outputs(model, hidden, targets, chunk_size, temperature, names)
    out = {}
    for i, name in enumerate(names):
        value = pieces[0][i] if len(pieces) == 1 else mx.concatenate([p[i] for p in pieces])
        out[name] = value if wanted[name] else mx.stop_gradient(value)
    return out


def selected_head_outputs(model: nn.Module, hidden: mx.array, targets: mx.array,
                          chunk_size: int, temperature: float, wanted: dict[str, bool],
                          train: bool, rows: tuple[np.ndarray, np.ndarray] | None
                          ) -> dict[str, mx.array]:
    """:func:`head_outputs` at the ``rows`` of :func:`algorithms.backend.head_rows` only (the
    positions a loss reads), 0 elsewhere; at every position when ``rows`` is None."""
    if rows is None:
        return head_outputs(model, hidden, targets, chunk_size, temperature, wanted, train)
    read = rows[1] != len(rows[0])
    if (~read).sum() <= DENSE_SKIPPED * len(read):
        # A few rows not read (a document's last token): running the head on them too costs
        # less than the gather and the scatter of its gradient; their outputs are zeroed.
        kept = mx.array(read)
        out = head_outputs(model, hidden, mx.where(kept, targets, 0), chunk_size, temperature,
                           wanted, train)
        return {name: mx.where(kept, v, 0.0) for name, v in out.items()}
    keep, inverse = mx.array(rows[0].astype(np.int32)), mx.array(rows[1].astype(np.int32))
    out = head_outputs(model, hidden[keep], targets[keep], chunk_size, temperature, wanted,
                       train)
    return {name: mx.concatenate([v, mx.zeros((1,), v.dtype)])[inverse]
            for name, v in out.items()}


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


def model_outputs(model: nn.Module, batch: dict, host: dict, chunk_size: int,
                  temperature: float, wanted: dict[str, bool], train: bool = False,
                  value_head: nn.Module | None = None,
                  teacher: nn.Module | None = None) -> dict[str, mx.array]:
    """The ``wanted`` outputs (name -> with gradient) of a ``[B, T]`` batch: one decoder pass
    (padding-free where :mod:`mlx_ft.varlen` applies: padding positions get 0), then the head
    statistics chunk by chunk, for ``values`` ``value_head`` on the final hidden states, and for
    ``teacher_divergence`` the ``teacher``'s pass beside the head (:mod:`mlx_ft.divergence`).
    ``host`` holds the numpy batch."""
    from .divergence import teacher_divergence, teacher_hidden

    head_mask = host.get(HEAD_MASK)

    def finish(h: mx.array, tgt: mx.array, docs: list | None = None) -> dict[str, mx.array]:
        mask = None if head_mask is None else \
            (head_mask.reshape(-1) if docs is None else varlen.doc_values(head_mask, docs))
        out = selected_head_outputs(model, h, tgt, chunk_size, temperature, wanted, train,
                                    head_rows(mask))
        if "values" in wanted:
            values = value_head(h.astype(mx.float32))[:, 0]
            out["values"] = values if wanted["values"] else mx.stop_gradient(values)
        if "teacher_divergence" in wanted:
            grad = train and wanted["teacher_divergence"]
            t_hidden = teacher_hidden(teacher, host, batch["_allowed"], docs)
            jsd = teacher_divergence(model, teacher, h, t_hidden, chunk_size, temperature,
                                     float(host["jsd_beta"]), grad)
            out["teacher_divergence"] = jsd if grad else mx.stop_gradient(jsd)
        return out

    if not varlen.supported(model):
        h = hidden_states(model, batch["input_ids"], batch["_allowed"])
        b, t, d = h.shape
        flat = finish(h.reshape(b * t, d), batch["targets"].reshape(b * t))
        return {k: v.reshape(b, t) for k, v in flat.items()}
    docs = varlen.documents(host["segment_ids"])
    groups = varlen.split_groups(docs, len(cpu_streams()))
    ordered: list = []
    values: dict[str, list[mx.array]] = {}
    for stream, group in zip(cpu_streams(), groups):
        with mx.stream(stream):
            h = varlen.hidden_states(model, host["input_ids"], group)
            flat = finish(h, varlen.gather_targets(host["targets"], group), group)
        at = 0
        for doc in group:
            ordered.append(doc)
            for name, value in flat.items():
                values.setdefault(name, []).append(value[at:at + doc.length])
            at += doc.length
    shape = tuple(host["input_ids"].shape)
    return {name: varlen.scatter_rows(shape, ordered, pieces) for name, pieces in values.items()}


def reference_token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """Plain ``log_softmax(logits)[targets]`` from full logits (tests only)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - precise.logsumexp(logits, axis=-1)
