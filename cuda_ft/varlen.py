"""Padding-free ("varlen") forward for the torch backend: only real tokens go through the model.

The documents of a ``[B, T]`` batch (:func:`algorithms.data.batching.document_spans`) are laid
end to end in one ``[1, N]`` sequence with each token's rotary position from its row (what the
padded path uses); attention runs document by document through an attention function
registered with transformers' ``AttentionInterface`` (its documented extension point; no
patching). Called without document spans (generation, any other caller) it is exactly
transformers' ``sdpa`` attention, and the mask builder is ``sdpa``'s, so switching a model to
it changes nothing else.

Used for the families in ``VARLEN``; ``POSTTRAIN_TORCH_VARLEN=0`` turns it off.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.data.batching import document_spans

NAME = "posttrain_varlen"
VARLEN = {"llama", "mistral", "qwen2", "qwen3"}
_registered = False


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """``[1, heads, N, d]`` inputs -> ``[1, N, heads, d]``, causal inside each span only."""
    spans = kwargs.pop("posttrain_spans", None)
    if spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outs = [F.scaled_dot_product_attention(
        query[:, :, s:s + n], key[:, :, s:s + n], value[:, :, s:s + n], is_causal=True,
        scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        for s, n in spans]
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


def flatten(batch: dict[str, np.ndarray], device: torch.device):
    """(input_ids [1, N], position_ids [1, N], targets [N], spans, (rows, cols) of each token)."""
    spans = document_spans(batch["segment_ids"])
    ids = np.concatenate([batch["input_ids"][r, s:s + n] for r, s, n in spans])
    targets = np.concatenate([batch["targets"][r, s:s + n] for r, s, n in spans])
    positions = np.concatenate([np.arange(s, s + n) for _, s, n in spans])
    rows = np.concatenate([np.full(n, r) for r, _, n in spans])
    starts = np.cumsum([0] + [n for _, _, n in spans])[:-1]

    def to(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    return (to(ids)[None], to(positions)[None], to(targets).clamp(min=0),
            [(int(a), n) for a, (_, _, n) in zip(starts, spans)], (to(rows), to(positions)))
