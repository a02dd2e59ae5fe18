"""The ``teacher_divergence`` model output on torch (GKD): the generalised Jensen-Shannon
divergence between the student's and the teacher's next-token distributions, per token.

The teacher runs once per micro-batch under ``no_grad`` to its final hidden states, for the
same tokens in the same order as the student's pass (padded rows flattened, or the real tokens
of the padding-free path). Then, ``chunk_size`` tokens at a time, both heads give their float32
logits ``z / T`` for the chunk only and :func:`algorithms.distill.jsd.generalized_jsd` (written
once for every backend) turns them into one number per token. With a gradient each chunk runs
under ``torch.utils.checkpoint`` (non-reentrant): only the chunk's hidden states are saved and
its logits are rebuilt in backward, so at most one chunk of each model's logits is alive.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from algorithms.distill.jsd import generalized_jsd

from .ops import TorchOps


def _chunk(head: nn.Module, t_head: nn.Module, h: torch.Tensor, ht: torch.Tensor,
           temperature: float, beta: float, ops: Any) -> torch.Tensor:
    z = head(h).float()
    with torch.no_grad():
        zt = t_head(ht).float()
    if temperature != 1.0:
        z, zt = z / temperature, zt / temperature
    return generalized_jsd(ops, z, zt, beta)


def teacher_divergence(hidden: torch.Tensor, head: nn.Module, t_hidden: torch.Tensor,
                       t_head: nn.Module, chunk_size: int, temperature: float, beta: float,
                       grad: bool) -> torch.Tensor:
    """``[N]`` divergences of the student's ``hidden [N, H]`` against the teacher's
    ``t_hidden [N, H_t]``; with ``grad`` the gradient reaches the student's hidden states (and
    a trainable head)."""
    ops = TorchOps(hidden.device)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, ht = hidden[start:start + chunk_size], t_hidden[start:start + chunk_size]
        if grad:
            pieces.append(checkpoint(_chunk, head, t_head, h, ht, temperature, beta, ops,
                                     use_reentrant=False))
        else:
            with torch.no_grad():
                pieces.append(_chunk(head, t_head, h, ht, temperature, beta, ops))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
