"""Per-token log-probabilities without materialising the full ``[B, T, V]`` logits.

The lm_head matmul followed by a float32 log-softmax is the memory wall of LLM training: for a
150k vocabulary, 8 rows of 4k tokens are 19 GB of float32 logits, and autograd keeps them (and
their gradient) alive until the backward pass. Here the ``B*T`` tokens are cut into chunks of
``chunk_size``; for each chunk

    log p(t | h) = (W h)[t] - logsumexp(W h)

is computed in float32 under ``torch.utils.checkpoint`` (non-reentrant), which keeps only the
chunk's hidden states and targets for backward and recomputes the chunk's logits there. So at
most one ``[chunk_size, V]`` block of logits exists at a time, forward or backward.

``reference_token_logps`` is the plain full-logits formula the chunked path is tested against.

When the output projection is a bias-free ``nn.Linear`` (every family here, tied or not),
:func:`head_token_logps` uses the fused head of :mod:`cuda_ft.kernels.fused_head` instead
(Triton on CUDA with ``--kernels auto|triton``, its torch twin otherwise): one pass over each
chunk's logits forward; for a frozen head the gradient w.r.t. the hidden states is formed in
that pass, so backward needs neither the logits nor their recomputation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_token_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """log p(targets | hidden) for ``hidden [N, H]``, ``targets [N]`` -> float32 ``[N]``,
    under ``softmax(logits / temperature)``."""
    logits = lm_head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                        chunk_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]) as float32 ``[B, T]``, ``chunk_size`` tokens at a time.

    ``hidden`` is ``[B, T, H]`` (the decoder's final, normed hidden states), ``lm_head`` the
    output embedding module (``model.get_output_embeddings()``), ``targets`` ``[B, T]`` token ids.
    Targets below zero (an ignore index) are read as token 0; their positions must be masked
    by the caller. Gradients flow to ``hidden`` and to the lm_head parameters. ``temperature``
    divides the logits first (online RL scores completions under the sampling distribution).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)
    flat_targets = targets.reshape(batch * length).long().clamp(min=0)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    pieces = []
    for start in range(0, batch * length, chunk_size):
        h = flat_hidden[start:start + chunk_size]
        t = flat_targets[start:start + chunk_size]
        if needs_grad:
            # Saves (h, t) only; the chunk's logits are rebuilt during backward and freed after.
            pieces.append(checkpoint(_chunk_token_logps, lm_head, h, t, temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(lm_head, h, t, temperature))
    return torch.cat(pieces).reshape(batch, length)


# --- the fused head: Triton or torch (cuda_ft/kernels/fused_head.py) -----------------------
def linear_head_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The ``[V, H]`` weight of a bias-free ``nn.Linear`` head (frozen or trained, tied to the
    embeddings or not), else None (then the checkpointed path runs)."""
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return None
    return lm_head.weight


def head_token_logps(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                     chunk_size: int, temperature: float = 1.0,
                     impl: str = "torch") -> torch.Tensor:
    """log p(targets | hidden) float32 ``[N]`` for ``hidden [N, H]``, ``targets [N]`` (< 0 -> 0).

    A Linear head goes through :func:`cuda_ft.kernels.fused_head.fused_linear_logprobs`
    (``impl`` "triton" or "torch", from ``--kernels``); any other head through the
    checkpointed chunks. Gradients reach ``hidden`` and a trained head weight either way.
    """
    weight = linear_head_weight(lm_head)
    if weight is None:
        return chunked_token_logps(hidden[None], lm_head, targets[None], chunk_size,
                                   temperature)[0]
    from .kernels.fused_head import fused_linear_logprobs

    return fused_linear_logprobs(hidden, weight, targets, temperature, chunk_size=chunk_size,
                                 impl=impl).logps
# --- end fused head ------------------------------------------------------------------------


@torch.no_grad()
def _chunked_statistic(hidden: torch.Tensor, lm_head: nn.Module, chunk_size: int,
                       statistic) -> torch.Tensor:
    """``statistic(float32 logits [N, V]) -> [N]`` at every position, chunk by chunk, no grad."""
    batch, length, width = hidden.shape
    flat = hidden.reshape(batch * length, width)
    pieces = [statistic(lm_head(flat[start:start + chunk_size]).float())
              for start in range(0, batch * length, chunk_size)]
    return torch.cat(pieces).reshape(batch, length)


def chunked_log_sum_sq(hidden: torch.Tensor, lm_head: nn.Module, chunk_size: int) -> torch.Tensor:
    """``log sum_v p_v^2`` per position (WPO's normaliser), chunk by chunk, no gradient:
    ``logsumexp(2 z) - 2 logsumexp(z)`` for the logits ``z``."""
    return _chunked_statistic(hidden, lm_head, chunk_size,
                              lambda z: torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))


def chunked_entropy(hidden: torch.Tensor, lm_head: nn.Module, chunk_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(z / T)`` per position, no gradient:
    ``H = logsumexp(z') - sum_v softmax(z')_v z'_v`` with ``z' = z / T``."""

    def entropy(z: torch.Tensor) -> torch.Tensor:
        z = z / temperature
        return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)

    return _chunked_statistic(hidden, lm_head, chunk_size, entropy)


def reference_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain ``log_softmax(logits).gather(targets)`` in float32: ``[B, T, V]`` -> ``[B, T]``."""
    logps = logits.float().log_softmax(dim=-1)
    return logps.gather(-1, targets.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
