"""The torch decode loop of rollout sampling: a row leaves the batch the step it finishes.

transformers' ``generate`` keeps every row of a batch until the last one ends, so in a GRPO
batch whose completions run 10 to 64 tokens, a third to a half of its decode work is spent on
rows that already hit EOS. Here the batch shrinks instead: each step runs the rows still
sampling, and a finished row's KV cache, mask and sampler leave with it
(``Cache.batch_select_indices``). Per step and row the numbers are those of ``generate``: the
same left-padded prompts, attention mask, positions (``cumsum(mask) - 1``), logits of the last
position only, and the same sampling chain (:class:`Sampler`).

Nash-MD's geometric mixture runs the reference beside the policy, each with its own cache, and
samples from ``(1 - c) log softmax(policy) + c log softmax(reference)`` (then the temperature
and filters, as transformers applies custom processors before its warpers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from algorithms.rl.sampling import SamplingParams, StopStringWatch


class Sampler:
    """``sampler(scores [b, V], rows) -> tokens [b]``: transformers' temperature, top-k, top-p
    and min-p warpers (its order), softmax, then a multinomial draw: with one seed per prompt,
    each row from its own generator (``rows`` are the prompts' indices), else one batched draw
    from the global RNG (seeded by the caller)."""

    def __init__(self, params: SamplingParams, seeds: Sequence[int] | None,
                 device: torch.device) -> None:
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.warpers = [TemperatureLogitsWarper(float(params.temperature))]
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(int(params.top_k)))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(float(params.top_p)))
        if params.min_p > 0.0:
            self.warpers.append(MinPLogitsWarper(float(params.min_p)))
        self.generators = None if seeds is None else \
            [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        if self.generators is None:
            return torch.multinomial(probs, 1)[:, 0]
        return torch.cat([torch.multinomial(probs[i], 1, generator=self.generators[row])
                          for i, row in enumerate(rows)])


def _forward_parameters(model: nn.Module) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def cache_keyword(model: nn.Module) -> str:
    """The model's name for its KV cache argument and output: ``cache`` in transformers 5.x,
    ``past_key_values`` before (a PEFT wrapper: its base model's)."""
    return _step_keywords(model)[0]


def _step_keywords(model: nn.Module) -> tuple[str, dict]:
    """The cache keyword and the one that makes the model compute the last position's logits
    only (its name changed across transformers versions; none: every position's)."""
    found = _forward_parameters(model)
    last = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in found), {})
    return ("cache" if "cache" in found else "past_key_values"), last


def _step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
          cache: Any, keywords: tuple[str, dict]) -> tuple[torch.Tensor, Any]:
    """Logits of the last position ``[b, V]`` and the grown cache."""
    name, last = keywords
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **last, **{name: cache})
    return out.logits[:, -1].float(), getattr(out, name)


def _select(caches: list, index: torch.Tensor) -> bool:
    """Keep the ``index`` rows of every cache; False (nothing changed) when a cache class
    cannot drop rows (then finished rows ride along, as in ``generate``)."""
    if not all(hasattr(c, "batch_select_indices") for c in caches if c is not None):
        return False
    for c in caches:
        if c is not None:
            c.batch_select_indices(index)
    return True


def decode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
           sampler: Callable[[torch.Tensor, Sequence[int]], torch.Tensor],
           eos_ids: Sequence[int], watch: StopStringWatch, prefix_cache: Any = None,
           reference: Any = None) -> list[list[int]]:
    """The sampled tokens of each row of the left-padded prompts ``ids`` / ``mask`` ``[B, P]``
    (EOS included when drawn; at most ``params.max_tokens``; a row stops when ``watch`` sees a
    stop string).

    ``prefix_cache``: the KV cache of ``ids[:, :-1]`` (shared prefill), so the first step runs
    the last prompt column only. ``reference``: with ``params.source == "mixture"``, a context
    manager factory yielding the reference model (module docstring).
    """
    eos = {int(e) for e in eos_ids}
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    rows = list(range(ids.shape[0]))  # the prompt index of each batch row
    sampled: list[list[int]] = [[] for _ in rows]
    mixture = params.source == "mixture"
    if prefix_cache is not None:
        step_ids, step_pos, cache = ids[:, -1:], positions[:, -1:], prefix_cache
    else:
        step_ids, step_pos, cache = ids, positions, None
    ref_ids, ref_pos, ref_cache = ids, positions, None  # the reference prefills the whole prompt
    done: set[int] = set()  # finished rows still in the batch (a cache that cannot drop rows)
    keywords: dict[int, tuple[str, dict]] = {}  # per model, looked up once (not every step)

    def step(m: nn.Module, *args: Any) -> tuple[torch.Tensor, Any]:
        if id(m) not in keywords:
            keywords[id(m)] = _step_keywords(m)
        return _step(m, *args, keywords[id(m)])

    for _ in range(int(params.max_tokens)):
        scores, cache = step(model, step_ids, mask, step_pos, cache)
        if mixture:
            with reference() as ref:
                ref_scores, ref_cache = step(ref, ref_ids, mask, ref_pos, ref_cache)
            c = float(params.mixture_coef)
            scores = (1.0 - c) * torch.log_softmax(scores, -1) \
                + c * torch.log_softmax(ref_scores, -1)
        tokens = sampler(scores, rows)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row in done:
                continue
            sampled[row].append(token)
            if token in eos or len(sampled[row]) >= params.max_tokens \
                    or (watch and watch.seen(sampled[row])):
                done.add(row)
            else:
                keep.append(i)
        if not keep:
            break
        last = step_pos[:, -1]
        if len(keep) < len(rows):  # a row finished: drop it, where the caches can
            index = torch.tensor(keep, device=ids.device)
            if _select([cache, ref_cache], index):
                rows = [rows[i] for i in keep]
                tokens, mask, last = tokens[index], mask[index], last[index]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids, step_pos = tokens[:, None], (last + 1)[:, None]
        ref_ids, ref_pos = step_ids, step_pos
    return sampled
