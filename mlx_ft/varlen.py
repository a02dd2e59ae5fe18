"""Padding-free ("varlen") forward: only real tokens go through the model.

A ``[B, T]`` batch (padded rows, or packed rows of several documents) is cut into its
documents (from ``segment_ids``); the documents are laid end to end in ONE sequence of ``N``
real tokens, so every linear layer multiplies ``[N, H]`` with no padding rows, and attention
runs document by document (causal inside each, never across), with each document's rotary
positions those of its place in its row. The numbers are those of the padded path (same
attention pattern, same positions), computed without the padding.

Documents that start with the same tokens (a GRPO group's prompt, a DPO pair's) share them:
:mod:`algorithms.data.prefix_tree` lays the documents out as a tree whose nodes attend to their
ancestors' keys and values, and the hidden states are gathered back per document (the gather's
gradient adds up the shared nodes' contributions). ``POSTTRAIN_MLX_SHARED_PREFIX=0`` turns it
off; ``=N`` shares runs of at least N tokens (default 16).

The documents can be split into groups run on separate MLX streams (``split_groups``; on a CPU
each stream is its own thread). Opt-in (``POSTTRAIN_MLX_STREAMS``): measured on MLX 0.32 the
groups of a training step barely overlap.

Valid for mlx-lm families whose blocks are exactly ``h = x + attn(norm1(x)); h + mlp(norm2(h))``
with q/k/v/o projections, optional q/k norms, rotary embeddings and no sliding window
(``VARLEN``); other models use the padded path.
"""

from __future__ import annotations

import dataclasses
import os

import mlx.core as mx
import numpy as np
from mlx import nn

from algorithms.data import prefix_tree
from algorithms.data.batching import document_spans

from . import fastmath
from .grad_checkpoint import run_block

VARLEN = {"llama", "mistral", "qwen2", "qwen3"}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale")


@dataclasses.dataclass(frozen=True)
class Doc:
    row: int
    start: int  # first position in its row (also its first rotary position)
    length: int


def documents(segment_ids: np.ndarray) -> list[Doc]:
    """Every document of the batch, row by row, in position order."""
    return [Doc(*span) for span in document_spans(segment_ids)]


def split_groups(docs: list[Doc], n: int) -> list[list[Doc]]:
    """``n`` groups of documents with near-equal token counts (longest first, greedy)."""
    groups: list[list[Doc]] = [[] for _ in range(max(1, min(n, len(docs))))]
    load = [0] * len(groups)
    for doc in sorted(docs, key=lambda d: -d.length):
        i = load.index(min(load))
        groups[i].append(doc)
        load[i] += doc.length
    return [g for g in groups if g]


def supported(model: nn.Module) -> bool:
    if os.environ.get("POSTTRAIN_MLX_VARLEN", "1") == "0":
        return False
    model_type = getattr(model, "model_type", None) or getattr(model.args, "model_type", "")
    if model_type not in VARLEN:
        return False
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, k) for k in ("embed_tokens", "layers", "norm")):
        return False
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if getattr(layer, "use_sliding", False) or attn is None \
                or not all(hasattr(attn, k) for k in _ATTENTION) \
                or not all(hasattr(layer, k) for k in ("mlp", "input_layernorm",
                                                       "post_attention_layernorm")):
            return False
    return True


def shared_min() -> int:
    """Shortest run of tokens shared between documents (0 = no sharing)."""
    return int(os.environ.get("POSTTRAIN_MLX_SHARED_PREFIX", "16"))


def _attention(attn: nn.Module, x: mx.array, spans: list[tuple], masks: list,
               rotary: tuple | None = None) -> mx.array:
    """Self-attention of ``x [1, N, H]`` span by span: ``(start in x, length, offset[,
    ancestors])``; a span attends to its ancestor spans' keys (all of them), then causally to
    its own (``masks``: :func:`span_masks`). ``rotary``: the tables of
    :func:`mlx_ft.fastmath.rotary_tables` for every token at once, else ``attn.rope`` per
    span."""
    n = x.shape[1]
    q = attn.q_proj(x).reshape(1, n, attn.n_heads, -1)
    k = attn.k_proj(x).reshape(1, n, attn.n_kv_heads, -1)
    v = attn.v_proj(x).reshape(1, n, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rotary is not None and 2 * rotary[0].shape[1] != q.shape[-1]:
        rotary = None  # a partial rotary embedding (dims < head dim): attn.rope per span
    if rotary is not None:
        q, k = (fastmath.rotary(t[0], rotary)[None] for t in (q, k))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    outs, keys = [], []
    for (start, length, offset, *tree), mask in zip(spans, masks):
        end = start + length
        qd, kd, vd = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        if rotary is None:
            qd, kd = attn.rope(qd, offset=offset), attn.rope(kd, offset=offset)
        keys.append(kd)
        if tree and tree[0]:
            kd = mx.concatenate([keys[a] for a in tree[0]] + [kd], axis=2)
            vd = mx.concatenate([v[:, :, spans[a][0]:spans[a][0] + spans[a][1]]
                                 for a in tree[0]] + [vd], axis=2)
        outs.append(fastmath.attention(qd, kd, vd, attn.scale, mask))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(1, n, -1))


def span_masks(spans: list[tuple]) -> list:
    """Each span's attention mask (its ancestors' keys, then itself causally), built once per
    forward for every layer (:func:`mlx_ft.fastmath.attention_mask`)."""
    return [fastmath.attention_mask(length, sum(spans[a][1] for a in tree[0]) if tree else 0)
            for _, length, _, *tree in spans]


def hidden_states(model: nn.Module, input_ids: np.ndarray, docs: list[Doc]) -> mx.array:
    """Final hidden states ``[N, H]`` of ``docs`` laid end to end (in the order given); shared
    prefixes are run once (module docstring)."""
    inner = model.model
    tree = prefix_tree.plan_spans(input_ids, [(d.row, d.start, d.length) for d in docs],
                                  shared_min()) if shared_min() else None
    gather = None
    if tree is not None and tree.shared:
        ids, gather = tree.input_ids, mx.array(tree.gather.astype(np.int32))
        spans = [(n.at, n.length, n.start, tuple(tree.ancestors(i)))
                 for i, n in enumerate(tree.nodes)]
    else:
        ids = np.concatenate([input_ids[d.row, d.start:d.start + d.length] for d in docs])
        spans, at = [], 0
        for d in docs:
            spans.append((at, d.length, d.start))
            at += d.length
    h = inner.embed_tokens(mx.array(ids[None].astype(np.int32)))
    masks = span_masks(spans)
    rotary = _rotary(inner.layers[0].self_attn, spans, h.dtype)
    for layer in inner.layers:
        h = run_block(layer, lambda x, layer=layer: _block(layer, x, spans, masks, rotary), h)
    h = fastmath.rms_norm(inner.norm, h)[0]
    return h if gather is None else h[gather]


def _rotary(attn: nn.Module, spans: list[tuple], dtype) -> tuple | None:
    """The rotary tables of every token (its position: its span's offset + its place in the
    span), shared by all layers; None where the native kernel does not apply."""
    if dtype != mx.float32:
        return None
    positions = np.zeros(sum(span[1] for span in spans), dtype=np.int64)
    for start, length, offset, *_ in spans:
        positions[start:start + length] = offset + np.arange(length)
    return fastmath.rotary_tables(attn.rope, positions)


def _block(layer: nn.Module, h: mx.array, spans: list[tuple], masks: list,
           rotary: tuple | None = None) -> mx.array:
    h = h + _attention(layer.self_attn, fastmath.rms_norm(layer.input_layernorm, h), spans,
                       masks, rotary)
    x = fastmath.rms_norm(layer.post_attention_layernorm, h)
    mlp = layer.mlp  # the VARLEN families' MLP is SwiGLU: gate, up, down
    return h + (fastmath.swiglu_mlp(mlp, x) if hasattr(mlp, "gate_proj") else mlp(x))


def doc_values(a: np.ndarray, docs: list[Doc]) -> np.ndarray:
    """A ``[B, T]`` array's values at the documents' positions, end to end (document order)."""
    return np.concatenate([a[d.row, d.start:d.start + d.length] for d in docs])


def gather_targets(targets: np.ndarray, docs: list[Doc]) -> mx.array:
    return mx.array(doc_values(targets, docs).astype(np.int32))


def scatter_rows(shape: tuple[int, int], docs: list[Doc], values: list[mx.array]) -> mx.array:
    """``[B, T]`` with each document's values at its positions, zeros elsewhere (padding)."""
    b, t = shape
    by_row: dict[int, list[tuple[int, mx.array]]] = {r: [] for r in range(b)}
    for doc, value in zip(docs, values):
        by_row[doc.row].append((doc.start, value))
    rows = []
    for r in range(b):
        pieces, at = [], 0
        for start, value in sorted(by_row[r], key=lambda p: p[0]):
            if start > at:
                pieces.append(mx.zeros((start - at,), dtype=value.dtype))
            pieces.append(value)
            at = start + value.shape[0]
        if at < t:
            pieces.append(mx.zeros((t - at,), dtype=mx.float32))
        rows.append(mx.concatenate(pieces) if len(pieces) > 1 else pieces[0])
    return mx.stack(rows)
