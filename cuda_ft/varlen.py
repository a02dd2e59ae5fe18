"""Padding-free ("varlen") forward for the torch backend: only real tokens go through the model.

The documents of a ``[B, T]`` batch (:func:`algorithms.data.batching.document_spans`) are laid
end to end in one ``[1, N]`` sequence with each token's rotary position from its row (what the
padded path uses); attention runs document by document through an attention function
registered with transformers' ``AttentionInterface`` (its documented extension point; no
patching). Called without document spans (generation, any other caller) it is exactly
transformers' ``sdpa`` attention, and the mask builder is ``sdpa``'s, so switching a model to
it changes nothing else.

Documents that start with the same tokens (a GRPO group's prompt, a DPO pair's) share them:
:mod:`algorithms.data.prefix_tree` lays them out as a tree whose nodes attend to their
ancestors' keys and values; :func:`flatten` returns the gather that puts the hidden states back
in document order. ``POSTTRAIN_TORCH_SHARED_PREFIX=0`` turns it off; ``=N`` shares runs of at
least N tokens (default 16).

Used for the families in ``VARLEN``; ``POSTTRAIN_TORCH_VARLEN=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.data import prefix_tree
from algorithms.data.batching import document_spans

NAME = "posttrain_varlen"
VARLEN = {"llama", "mistral", "qwen2", "qwen3"}
_registered = False


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """``[1, heads, N, d]`` inputs -> ``[1, N, heads, d]``, causal inside each span only; a
    span ``(start, length, ancestors)`` first sees every key of its ancestor spans."""
    spans = kwargs.pop("posttrain_spans", None)
    if spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, n, *tree in spans:
        k, v, mask = key[:, :, s:s + n], value[:, :, s:s + n], None
        if tree and tree[0]:
            index = torch.cat([torch.arange(spans[a][0], spans[a][0] + spans[a][1])
                               for a in tree[0]] + [torch.arange(s, s + n)]).to(key.device)
            k, v = key.index_select(2, index), value.index_select(2, index)
            own = torch.arange(n, device=key.device)
            mask = torch.cat([torch.ones(n, len(index) - n, dtype=torch.bool,
                                         device=key.device), own[None, :] <= own[:, None]], 1)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, s:s + n], k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, varlen_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def enable(hf_model: nn.Module) -> bool:
    """Switch ``hf_model`` to the varlen attention if its family supports it; True if on."""
    if os.environ.get("POSTTRAIN_TORCH_VARLEN", "1") == "0":
        return False
    if getattr(hf_model.config, "_attn_implementation", None) == NAME:
        return True
    config = hf_model.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if getattr(config, "model_type", "") not in VARLEN or sliding:
        return False
    _register()
    try:
        hf_model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError, TypeError):
        return False
    return True


def shared_min() -> int:
    """Shortest run of tokens shared between documents (0 = no sharing)."""
    return int(os.environ.get("POSTTRAIN_TORCH_SHARED_PREFIX", "16"))


def flatten(batch: dict[str, np.ndarray], device: torch.device):
    """(input_ids [1, M], position_ids [1, M], targets [N], spans, (rows, cols) of each token,
    gather [N] or None): the decoder runs the M flat tokens; ``hidden[gather]`` are the hidden
    states of the batch's N real tokens in document order (M = N and no gather when no
    prefix is shared)."""
    spans = document_spans(batch["segment_ids"])
    targets = np.concatenate([batch["targets"][r, s:s + n] for r, s, n in spans])
    positions = np.concatenate([np.arange(s, s + n) for _, s, n in spans])
    rows = np.concatenate([np.full(n, r) for r, _, n in spans])

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    where = (to(rows), to(positions))
    tree = prefix_tree.plan_spans(batch["input_ids"], spans, shared_min()) \
        if shared_min() else None
    if tree is not None and tree.shared:
        nodes = [(n.at, n.length, tuple(tree.ancestors(i))) for i, n in enumerate(tree.nodes)]
        return (to(tree.input_ids)[None], to(tree.positions)[None], to(targets).clamp(min=0),
                nodes, where, to(tree.gather))
    ids = np.concatenate([batch["input_ids"][r, s:s + n] for r, s, n in spans])
    starts = np.cumsum([0] + [n for _, _, n in spans])[:-1]
    return (to(ids)[None], to(positions)[None], to(targets).clamp(min=0),
            [(int(a), n) for a, (_, _, n) in zip(starts, spans)], where, None)


def flat_values(array: np.ndarray | None, where: Any) -> np.ndarray | None:
    """A ``[B, T]`` array in the order of the flat hidden states: row-major, or at the real
    tokens ``where`` (from :func:`flatten`) of the padding-free path; None stays None."""
    if array is None or where is None:
        return None if array is None else np.asarray(array).reshape(-1)
    return np.asarray(array)[where[0].cpu().numpy(), where[1].cpu().numpy()]
