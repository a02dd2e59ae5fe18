"""Batched rollout sampling on torch: left-padded prompt chunks through :mod:`cuda_ft.decode`.

Prompts are cut into chunks of ``params.batch_size`` (all at once when 0). Each chunk is
left-padded with the pad id and an attention mask of 0 on the padding, with position ids
``cumsum(mask) - 1``, so a padded prompt sees the positions and keys it would see alone. The
decode loop (:func:`cuda_ft.decode.decode`) drops a row from the batch the step it finishes
(transformers' ``generate`` would keep computing it until the chunk's longest row ends) and
samples with transformers' own chain (temperature, top-k, top-p, min-p, then
``torch.multinomial``), every filter set from ``params``, so no default of the model's
``generation_config.json`` (a repetition penalty, a top-k of 50...) slips in.

Seeding: the whole call runs inside ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``,
so the same seed gives the same completions and the training RNG stream is left as it was. With
one seed per prompt (what the online loop passes), each row draws from its own generator, so a
completion does not depend on the other prompts of the call, the chunking, or which rank of a
distributed run samples it. Stop strings end a row early (the same :class:`StopStringWatch` as
the MLX backend); :func:`algorithms.rl.sampling.finish` decides where each completion ends.
Nash-MD's geometric mixture of policy and reference runs the reference beside the policy in the
same loop, each with its own KV cache.

Shared prompts: when a chunk holds repeated prompts (the ``G`` completions of a GRPO group),
each distinct prompt is prefilled once (all its padded columns but the last, with the positions
the rows would give them) and the KV cache is expanded to the rows that start from it; the
decode loop then runs only the last prompt column before sampling.
``POSTTRAIN_TORCH_SHARED_PREFILL=0`` prefills every row (to measure it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from algorithms.rl.sampling import (
    Completion,
    SamplingParams,
    StopStringWatch,
    check_prompts,
    chunks,
    finish,
)

from .decode import Sampler, cache_keyword, decode


def left_pad(prompts: list[list[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` with each prompt flush right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def shared_prefix_cache(model: nn.Module, rows: list[list[int]], ids: torch.Tensor,
                        mask: torch.Tensor) -> Any | None:
    """The KV cache of ``ids[:, :-1]`` (left-padded prompts) computed once per distinct prompt
    and expanded to every row, or None when no prompt repeats (nothing to share)."""
    if os.environ.get("POSTTRAIN_TORCH_SHARED_PREFILL", "1") == "0" or ids.shape[1] < 2:
        return None
    first: dict[tuple, int] = {}
    owner = [first.setdefault(tuple(p), len(first)) for p in rows]
    if len(first) == len(rows):
        return None
    distinct = torch.tensor([owner.index(i) for i in range(len(first))], device=ids.device)
    prefix_mask = mask[distinct, :-1]
    positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 1)
    out = model(input_ids=ids[distinct, :-1], attention_mask=prefix_mask,
                position_ids=positions, use_cache=True)
    cache = getattr(out, cache_keyword(model))
    cache.reorder_cache(torch.tensor(owner, device=ids.device))
    return cache


def _training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def sample(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
           params: SamplingParams, seed: int | Sequence[int], eos_ids: Sequence[int],
           device: torch.device,
           autocast: contextlib.AbstractContextManager | None = None,
           reference: Any = None) -> list[Completion]:
    """One :class:`Completion` per prompt, in order (see ``Backend.sample``); ``seed`` is one
    seed for the call or one per prompt.

    ``model`` is the model that samples (PEFT wrapper or plain HF model); every module is put
    in eval mode for sampling and given back its previous mode afterwards. With
    ``params.source == "mixture"``, ``reference`` (a context manager factory yielding the
    reference model) is the second model of the mixture.
    """
    prompts = check_prompts(prompts)
    if not prompts:
        return []
    if not eos_ids:
        raise ValueError("eos_ids is empty: a completion could only end at max_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])
    seeds = None if isinstance(seed, int) else [int(s) for s in seed]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    watch = StopStringWatch(tokenizer, params.stop)
    modes = _training_modes(model)
    model.eval()
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    sampled: list[list[int]] = []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), \
                (autocast or contextlib.nullcontext()):
            torch.manual_seed(int(seed) if seeds is None else 0)
            for rows in chunks(len(prompts), params.batch_size):
                chunk = [prompts[i] for i in rows]
                ids, mask = left_pad(chunk, pad_id, device)
                sampler = Sampler(params, None if seeds is None else [seeds[i] for i in rows],
                                  device)
                sampled += decode(model, ids, mask, params, sampler, eos_ids, watch,
                                  shared_prefix_cache(model, chunk, ids, mask), reference)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return [finish(ids, tokenizer, params, eos_ids) for ids in sampled]
