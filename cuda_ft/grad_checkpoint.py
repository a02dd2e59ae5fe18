"""Activation checkpointing per transformer block (``--grad-checkpoint``) on the torch backend.

Each decoder block is re-classed (:func:`cuda_ft.kernel_patch.reclass`; names and parameters
unchanged) so that, whenever autograd records, its forward runs under
``torch.utils.checkpoint`` (non-reentrant): only the block's input is kept, and the block is
run again during backward to rebuild its activations. Memory for activations drops from
``layers x (everything a block saves)`` to ``layers x [tokens, hidden]`` plus one block's worth;
compute grows by one forward pass. The RNG state is restored for the recomputation, so LoRA
dropout draws the same mask twice and the numbers equal those without checkpointing. Both the
padded and the padding-free (:mod:`cuda_ft.varlen`) forward go through the blocks' ``forward``
and so are covered. Unlike transformers' own ``gradient_checkpointing_enable`` this does not
require train mode (the backend keeps the base model in eval mode: no dropout).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernel_patch import reclass


class CheckpointedBlockMixin:
    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


def enable(hf_model: nn.Module, blocks: list[int] | None = None) -> int:
    """Checkpoint the ``blocks`` (indices; None: all) of ``hf_model``'s decoder; returns how
    many."""
    from .model import decoder_blocks

    _, layers = decoder_blocks(hf_model)
    chosen = range(len(layers)) if blocks is None else blocks
    for i in chosen:
        reclass(layers[i], CheckpointedBlockMixin)
    return len(chosen)
