"""Per-token outputs of the output head without materialising the full ``[B, T, V]`` logits.

The lm_head matmul followed by a float32 log-softmax is the memory wall of LLM training: for a
150k vocabulary, 8 rows of 4k tokens are 19 GB of float32 logits, and autograd keeps them (and
their gradient) alive until the backward pass. Here the ``N`` tokens are cut into chunks of
``chunk_size``; for each chunk the logits ``z = (W h) / T`` exist once, in float32, and give
every statistic a loss asked for (:data:`HEAD_OUTPUTS`):

    logps       z[t] - lse(z)                       (lse = logsumexp over the vocabulary)
    entropy     -sum_v p_v log p_v,  p = softmax(z)
    log_sum_sq  log sum_v p_v^2

Two paths, the same numbers up to float rounding:

- a bias-free ``nn.Linear`` head with Triton (``--kernels auto|triton`` on CUDA), or a frozen
  one (LoRA / DoRA) on any device: the fused head of :mod:`cuda_ft.kernels.fused_head` (its
  torch twin off CUDA): one pass over each chunk's logits gives every statistic; for a frozen
  head the gradient of ``logps`` w.r.t. the hidden states is formed in that pass, so backward
  needs neither the logits nor their recomputation; gradients reach ``entropy`` too;
- any other head (a trained head on the torch path, a head with a bias...): each chunk under
  ``torch.utils.checkpoint`` (non-reentrant), which saves only the chunk's hidden states and
  targets and recomputes its logits in backward (without a gradient: a plain loop).

``reference_token_logps`` / ``reference_outputs`` are the plain full-logits formulas the chunked
paths are tested against.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

HEAD_OUTPUTS = ("logps", "entropy", "log_sum_sq")


def _statistics(z: torch.Tensor, targets: torch.Tensor, wanted: tuple[str, ...]) -> list:
    """The ``wanted`` statistics of float32 logits ``z [n, V]`` (already divided by T)."""
    lse = torch.logsumexp(z, dim=-1)
    out = []
    logp = z - lse.unsqueeze(-1) if ("entropy" in wanted or "log_sum_sq" in wanted) else None
    for name in wanted:
        if name == "logps":
            out.append(z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse)
        elif name == "entropy":
            out.append(-(logp.exp() * logp).sum(-1))
        else:  # log_sum_sq
            out.append(torch.logsumexp(2 * logp, dim=-1))
    return out


def _chunk(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
           wanted: tuple[str, ...]) -> tuple:
    z = lm_head(hidden).float()
    if temperature != 1.0:
        z = z / temperature
    return tuple(_statistics(z, targets, wanted))


def linear_head_weight(lm_head: nn.Module) -> torch.Tensor | None:
    """The ``[V, H]`` weight of a bias-free ``nn.Linear`` head (frozen or trained, tied to the
    embeddings or not), else None (then the checkpointed path runs)."""
    if type(lm_head) is not nn.Linear or lm_head.bias is not None:
        return None
    return lm_head.weight


def head_outputs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                 chunk_size: int, temperature: float, wanted: dict[str, bool],
                 impl: str = "torch") -> dict:
    """The ``wanted`` statistics (name -> with gradient) of ``hidden [N, H]``, float32 ``[N]``.

    ``targets`` below zero (an ignore index) are read as token 0; their positions must be masked
    by the caller. ``impl`` ("triton" or "torch", from ``--kernels``) picks the fused head's
    row passes. An output asked without gradient is detached.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    names = tuple(n for n in HEAD_OUTPUTS if n in wanted)
    if not names:
        return {}
    targets = targets.long().clamp(min=0)
    grad_on = torch.is_grad_enabled() and any(wanted[n] for n in names) and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    weight = linear_head_weight(lm_head)
    # The fused head for Triton, and for a frozen head (LoRA / DoRA) where it saves the backward
    # recompute; a trained head on the torch path keeps autograd's own log-softmax backward
    # (the numbers of TRL's trainers to float32 rounding: tests/test_trl_parity.py).
    if weight is not None and (impl == "triton" or not weight.requires_grad):
        from .kernels.fused_head import fused_linear_logprobs

        with contextlib.nullcontext() if grad_on else torch.no_grad():
            fused = fused_linear_logprobs(hidden, weight, targets, temperature,
                                          with_entropy="entropy" in names,
                                          with_log_sum_sq="log_sum_sq" in names,
                                          chunk_size=chunk_size, impl=impl)
        found = {"logps": fused.logps, "entropy": fused.entropy, "log_sum_sq": fused.log_sum_sq}
        return {n: found[n] if wanted[n] else found[n].detach() for n in names}
    pieces: list[tuple] = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if grad_on:
            # Saves (h, t) only; the chunk's logits are rebuilt during backward and freed after.
            pieces.append(checkpoint(_chunk, lm_head, h, t, temperature, names,
                                     use_reentrant=False))
        else:
            with torch.no_grad():
                pieces.append(_chunk(lm_head, h, t, temperature, names))
    out = {}
    for i, name in enumerate(names):
        value = pieces[0][i] if len(pieces) == 1 else torch.cat([p[i] for p in pieces])
        out[name] = value if wanted[name] else value.detach()
    return out


def selected_head_outputs(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                          chunk_size: int, temperature: float, wanted: dict[str, bool],
                          impl: str, rows: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """:func:`head_outputs` at the ``rows`` of :func:`algorithms.backend.head_rows` only (the
    positions a loss reads), 0 elsewhere; at every position when ``rows`` is None."""
    if rows is None:
        return head_outputs(hidden, lm_head, targets, chunk_size, temperature, wanted, impl)
    keep = torch.from_numpy(rows[0]).to(hidden.device)
    inverse = torch.from_numpy(rows[1]).to(hidden.device)
    out = head_outputs(hidden[keep], lm_head, targets[keep], chunk_size, temperature, wanted,
                       impl)
    return {name: torch.cat([v, v.new_zeros(1)])[inverse] for name, v in out.items()}


def chunked_token_logps(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor,
                        chunk_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[b, t] | hidden[b, t]) as float32 ``[B, T]`` (the checkpointed path when a
    gradient is needed): :func:`head_outputs` for ``logps`` over ``[B, T, H]`` hidden states."""
    batch, length, width = hidden.shape
    logps = head_outputs(hidden.reshape(batch * length, width), lm_head,
                         targets.reshape(batch * length), chunk_size, temperature,
                         {"logps": True})["logps"]
    return logps.reshape(batch, length)


def reference_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain ``log_softmax(logits).gather(targets)`` in float32: ``[B, T, V]`` -> ``[B, T]``."""
    logps = logits.float().log_softmax(dim=-1)
    return logps.gather(-1, targets.long().clamp(min=0).unsqueeze(-1)).squeeze(-1)


def reference_outputs(logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Every head statistic from full ``[..., V]`` logits (tests only)."""
    z = logits.float() / temperature
    logp = z.log_softmax(dim=-1)
    p = logp.exp()
    return {"logps": logp.gather(-1, targets.long().clamp(min=0).unsqueeze(-1)).squeeze(-1),
            "entropy": -(p * logp).sum(-1), "log_sum_sq": torch.log((p * p).sum(-1))}
