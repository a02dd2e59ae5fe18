"""The ``teacher_divergence`` model output on MLX (GKD): the generalised Jensen-Shannon
divergence between the student's and the teacher's next-token distributions, per token.

The teacher runs once per micro-batch without gradient to its final hidden states, for the same
tokens, in the same order, as the student's pass (padded rows flattened, or the documents of the
padding-free path laid end to end). Then, ``chunk_size`` tokens at a time, both heads give their
float32 logits ``z / T`` for the chunk only, and :func:`algorithms.distill.jsd.generalized_jsd`
(written once for every backend) turns them into one number per token. With a gradient each
chunk runs under ``mx.checkpoint``: backward recomputes the chunk's logits instead of keeping
them, so at most one chunk of each model's logits is alive.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from algorithms.distill.jsd import generalized_jsd

from . import varlen
from .model import lm_head_module
from .ops import MLXOps


def teacher_hidden(teacher: nn.Module, host: dict, allowed: np.ndarray | None,
                   docs: list | None = None) -> mx.array:
    """The teacher's final hidden states ``[N, H_t]`` (detached) for the rows of ``host``
    flattened (``docs`` None) or for ``docs`` laid end to end (the padding-free layout)."""
    from .logprobs import hidden_states

    if docs is not None and varlen.supported(teacher):
        out = varlen.hidden_states(teacher, host["input_ids"], docs)
    else:
        h = hidden_states(teacher, mx.array(host["input_ids"]), allowed)
        out = h.reshape(-1, h.shape[-1]) if docs is None \
            else mx.concatenate([h[d.row, d.start:d.start + d.length] for d in docs])
    out = mx.stop_gradient(out)
    # evaluated now, so the teacher's activations are freed before the student's graph runs
    # (lazily, they would all be alive with the student's at the loss's evaluation)
    mx.eval(out)
    return out


def teacher_divergence(model: nn.Module, teacher: nn.Module, hidden: mx.array,
                       t_hidden: mx.array, chunk_size: int, temperature: float, beta: float,
                       grad: bool) -> mx.array:
    """``[N]`` divergences of ``hidden [N, H]`` (student) against ``t_hidden [N, H_t]``;
    with ``grad`` the gradient reaches the student's hidden states and a trainable head."""
    head, method = lm_head_module(model)
    t_head, t_method = lm_head_module(teacher)
    ops = MLXOps()

    def chunk(params: dict, h: mx.array, ht: mx.array) -> mx.array:
        head.update(params)
        z = getattr(head, method)(h).astype(mx.float32)
        zt = mx.stop_gradient(getattr(t_head, t_method)(ht).astype(mx.float32))
        if temperature != 1.0:
            z, zt = z / temperature, zt / temperature
        return generalized_jsd(ops, z, zt, beta)

    params = head.trainable_parameters()
    pieces = []
    if grad:
        checkpointed = mx.checkpoint(chunk)
        for i in range(0, hidden.shape[0], chunk_size):
            pieces.append(checkpointed(params, hidden[i:i + chunk_size],
                                       t_hidden[i:i + chunk_size]))
    else:
        hidden = mx.stop_gradient(hidden)
        for i in range(0, hidden.shape[0], chunk_size):
            pieces.append(chunk(params, hidden[i:i + chunk_size], t_hidden[i:i + chunk_size]))
            mx.eval(pieces[-1])
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)
