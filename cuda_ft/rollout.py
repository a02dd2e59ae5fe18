"""Batched rollout sampling on torch, through transformers' ``generate`` on the (PEFT) model.

Prompts are cut into chunks of ``params.batch_size`` (all at once when 0). Each chunk is
left-padded with the pad id and an attention mask of 0 on the padding; ``generate`` derives
position ids from the mask (``cumsum - 1``), so a padded prompt sees the positions and keys it
would see alone. Sampling is transformers' own chain (temperature, top-k, top-p, min-p, then
``torch.multinomial``), set explicitly in a fresh ``GenerationConfig`` so that no default from the
model's ``generation_config.json`` (a repetition penalty, a top-k of 50...) slips in.

Seeding: the whole call runs inside ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``,
so the same seed gives the same completions and the training RNG stream is left as it was. With
one seed per prompt (what the online loop passes), each row draws from its own generator
(:class:`RowSeededSampler`: transformers' warpers in its sampling order, then a draw per row),
so a completion does not depend on the other prompts of the call, the chunking, or which rank of
a distributed run samples it.
Stop strings end a row early through a stopping criterion built on the same
:class:`StopStringWatch` as the MLX backend; :func:`algorithms.rl.sampling.finish` decides where
each completion ends. Nash-MD's geometric mixture of policy and reference is a logits processor
(:func:`mixture_processor`) that runs the reference beside ``generate``'s own pass.

Shared prompts: when a chunk holds repeated prompts (the ``G`` completions of a GRPO group),
each distinct prompt is prefilled once (all its padded columns but the last, with the positions
``generate`` would give them) and the KV cache is expanded to the rows that start from it;
``generate`` then only runs the last prompt column before decoding. ``generate``'s own
``num_return_sequences`` expands the prompts before the prefill, so it would not share it.
``POSTTRAIN_TORCH_SHARED_PREFILL=0`` prefills every row (to measure it).
"""

from __future__ import annotations

import contextlib
import inspect
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


class RowSeededSampler:
    """A logits processor that samples: transformers' temperature, top-k, top-p and min-p
    warpers (its sampling order), then each row's token drawn with that row's own generator;
    the drawn token scores 0 and every other -inf, so ``generate``'s greedy choice takes it."""

    def __init__(self, params: SamplingParams, seeds: Sequence[int], device: torch.device):
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
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat([torch.multinomial(probs[row], 1, generator=gen)
                           for row, gen in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks[:, None], 0.0)


def generation_config(params: SamplingParams, eos_ids: Sequence[int], pad_id: int,
                      per_row: bool = False) -> Any:
    """A ``GenerationConfig`` that samples exactly ``params`` (every filter set explicitly);
    ``per_row``: greedy over the scores of a :class:`RowSeededSampler`, which samples."""
    from transformers import GenerationConfig

    if per_row:
        filters = {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": 1.0,
                   "min_p": None}
    else:
        filters = {"do_sample": True, "temperature": float(params.temperature),
                   "top_k": int(params.top_k), "top_p": float(params.top_p),
                   "min_p": float(params.min_p)}
    return GenerationConfig(
        num_beams=1, num_return_sequences=1, **filters, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_new_tokens=0, max_new_tokens=int(params.max_tokens),
        eos_token_id=[int(e) for e in eos_ids], pad_token_id=int(pad_id), use_cache=True,
    )


def _stop_string_criteria(watch: StopStringWatch, prompt_width: int) -> list:
    """A transformers stopping criterion: a row is done once ``watch`` sees a stop string in its
    completion (the tokens after the padded prompt)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = [watch.seen(row[prompt_width:].tolist()) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()]) if watch else StoppingCriteriaList()


def mixture_processor(reference: Any, coef: float, prompt_mask: torch.Tensor) -> Any:
    """A transformers logits processor for Nash-MD's geometric mixture: the policy's next-token
    logits (what ``generate`` passes) become ``(1 - c) log softmax(policy) + c log
    softmax(reference)``, before the temperature and filters (custom processors run first).

    ``reference`` is a context manager factory yielding the reference HF model (for LoRA the
    policy's base with its adapters disabled for the call). The reference keeps its own KV
    cache: the prompt on the first call, then the token ``generate`` appended since, with the
    left-padding mask extended by ones and positions ``cumsum(mask) - 1`` (what ``generate``
    gives the policy).
    """
    from transformers import LogitsProcessor

    class GeometricMixture(LogitsProcessor):
        def __init__(self) -> None:
            self.cache, self.mask = None, prompt_mask

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.cache is None:
                ids = input_ids
            else:
                ids = input_ids[:, -1:]
                self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            with reference() as ref:
                # transformers 5.x names the KV cache ``cache``; 4.x ``past_key_values``
                name = "cache" if "cache" in inspect.signature(ref.forward).parameters \
                    else "past_key_values"
                out = ref(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                          use_cache=True, **{name: self.cache})
            self.cache = getattr(out, name)
            policy = torch.log_softmax(scores.float(), dim=-1)
            ref_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            return (1.0 - coef) * policy + coef * ref_logp

    return GeometricMixture()


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
    cache = out.past_key_values
    cache.reorder_cache(torch.tensor(owner, device=ids.device))
    return cache


def _cache_keyword() -> str:
    """``generate``'s name for a prefilled cache: ``cache`` in recent transformers (which warn
    on ``past_key_values``), ``past_key_values`` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


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
    reference model) supplies the second half of :func:`mixture_processor`.
    """
    from transformers import LogitsProcessorList

    prompts = check_prompts(prompts)
    if not prompts:
        return []
    if not eos_ids:
        raise ValueError("eos_ids is empty: a completion could only end at max_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])
    seeds = None if isinstance(seed, int) else [int(s) for s in seed]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
    config = generation_config(params, eos_ids, pad_id, per_row=seeds is not None)
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
                cache = shared_prefix_cache(model, chunk, ids, mask)
                extra = {_cache_keyword(): cache} if cache is not None else {}
                processors = [mixture_processor(reference, params.mixture_coef, mask)] \
                    if params.source == "mixture" else []
                if seeds is not None:  # after the mixture: the filters act on the mixed scores
                    processors.append(RowSeededSampler(params, [seeds[i] for i in rows], device))
                out = model.generate(input_ids=ids, attention_mask=mask,
                                     generation_config=config, **extra,
                                     logits_processor=LogitsProcessorList(processors),
                                     stopping_criteria=_stop_string_criteria(watch, ids.shape[1]),
                                     synced_gpus=False)  # FSDP2: gathered, no lockstep
                sampled += out[:, ids.shape[1]:].tolist()
    finally:
        for module, mode in modes.items():
            module.training = mode
    return [finish(ids, tokenizer, params, eos_ids) for ids in sampled]
