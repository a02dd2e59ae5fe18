"""Batched rollout sampling on MLX, on mlx-lm's ``BatchGenerator`` (continuous batching).

What mlx-lm provides and we use as is: the KV caches (``BatchKVCache``), prompt prefill with
ragged lengths (prompts are right-padded for the prefill, then the cache is rolled so the padding
sits on the left, masked, with each row's RoPE offset starting at 0: a padded prompt is computed
exactly as if it were alone), the decode loop that drops finished rows from the batch, EOS
handling, and ``params.batch_size`` as the number of rows decoding at once (a finished row's slot
is refilled by the next waiting prompt).

What we supply: the sampler. mlx-lm's ``make_sampler`` applies top-p / min-p to the untempered
log-probs; ours applies the chain of :mod:`algorithms.rl.sampling` (temperature, top-k, top-p,
min-p, in transformers' order, using mlx-lm's filter functions) and draws with its own numpy
generator seeded by ``seed`` (Gumbel-max, :class:`FilteredSampler`), so the same seed gives the
same completions and the global RNG (dropout) is untouched. With one seed per prompt (what the
online loop passes) every row has its own sampler and generator (mlx-lm's per-sequence
samplers), so a completion does not depend on the other prompts of the call, ``batch_size``,
or which rank of a distributed run samples it. Stop strings end a row early when
:class:`StopStringWatch` sees one; :func:`algorithms.rl.sampling.finish` decides where each
completion ends.

Nash-MD samples from :class:`GeometricMixture`, a model-like wrapper of the policy and the
reference: the generator calls it like a model, and the mixture's log-probs go through the same
sampler.

Shared prompts: the ``G`` completions of a GRPO group start from the same prompt, so each
distinct prompt is prefilled once (all but its last token, batch of one) and its KV cache handed
to every row that starts from it (``BatchGenerator.insert(caches=...)`` copies its filled part
into the batch cache); the rows then start from the prompt's last token. The prefill costs
``1/G`` of the per-row one, and the rows see the keys and values they would have computed
themselves. ``POSTTRAIN_MLX_SHARED_PREFILL=0`` prefills every row on its own (to measure it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from algorithms.rl.sampling import (
    Completion,
    SamplingParams,
    StopStringWatch,
    check_prompts,
    finish,
)


class FilteredSampler:
    """``sampler(logprobs [B, V]) -> tokens [B]``: temperature, top-k, top-p, min-p, then a
    Gumbel-max draw, ``argmax(logits + g)`` with ``g = -log(-log(u))``, the uniforms ``u`` from
    a numpy generator seeded by ``seed``.

    The draw is ``mx.random.categorical``'s, with its noise made by numpy (PCG64 uniforms and
    two vectorised logs: ~7 ms for a ``[32, 49152]`` step on the x86 CPU of
    ``benchmarks/RESULTS.md``, where MLX's own draw takes ~30 ms). Each call draws ``B x V``
    uniforms, so a run is reproducible given the same calls in the same order (the same
    prompts, parameters and ``batch_size``).
    """

    def __init__(self, params: SamplingParams, seed: int) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(int(seed)))

    def filtered_logits(self, logprobs: mx.array) -> mx.array:
        """Tempered logits with the filtered-out tokens at ``-inf`` (float32)."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        p = self.params
        logits = logprobs.astype(mx.float32) / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            logits = apply_top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = apply_top_p(logits, p.top_p)
        if p.min_p > 0.0:
            logits = apply_min_p(logits, p.min_p)
        return logits

    def __call__(self, logprobs: mx.array) -> mx.array:
        uniform = self.rng.random(tuple(logprobs.shape), dtype=np.float32)
        with np.errstate(divide="ignore"):  # u = 0: noise -inf, a token never drawn (p 2^-24)
            noise = -np.log(-np.log(uniform))
        return mx.argmax(self.filtered_logits(logprobs) + mx.array(noise), axis=-1)


class GeometricMixture:
    """Nash-MD's sampling model: ``(1 - c) log softmax(policy) + c log softmax(reference)``
    per position, each model with its own KV caches (the policy's first in the cache list).

    ``reference`` is a context manager factory yielding the reference module (for LoRA the
    policy itself with its adapters swapped out for the call), so one module can serve as both.
    ``mlx_lm``'s ``BatchGenerator`` calls the model and builds its caches (``make_cache``),
    nothing else; it renormalises what the model returns.
    """

    def __init__(self, policy: nn.Module, reference: Any, coef: float) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.policy, self.reference, self.coef = policy, reference, float(coef)
        self._make = make_prompt_cache
        self.n_policy = len(make_prompt_cache(policy))

    @property
    def training(self) -> bool:
        return self.policy.training

    def train(self, mode: bool = True) -> None:
        self.policy.train(mode)

    def eval(self) -> None:
        self.policy.eval()
        with self.reference() as ref:
            ref.eval()

    def make_cache(self) -> list:
        with self.reference() as ref:
            return self._make(self.policy) + self._make(ref)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        n = self.n_policy
        policy = self.policy(inputs, cache=cache[:n]).astype(mx.float32)
        with self.reference() as ref:
            reference = ref(inputs, cache=cache[n:]).astype(mx.float32)
        policy = policy - mx.logsumexp(policy, axis=-1, keepdims=True)
        reference = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
        return (1.0 - self.coef) * policy + self.coef * reference


def shared_prefill(model: nn.Module, prompts: list[list[int]]) -> tuple[list, list] | None:
    """``(prompts to insert, their caches)`` when some prompt repeats: each distinct prompt's
    tokens but the last run through the model once into a KV cache, and every row gets its
    prompt's cache and only the last token; None (prefill row by row) otherwise."""
    from mlx_lm.models.cache import make_prompt_cache

    distinct = {tuple(p) for p in prompts}
    if os.environ.get("POSTTRAIN_MLX_SHARED_PREFILL", "1") == "0" or len(distinct) == len(prompts):
        return None
    caches: dict[tuple, list] = {}
    for p in dict.fromkeys(tuple(p) for p in prompts):
        cache = make_prompt_cache(model)
        if len(p) > 1:
            model(mx.array(p[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
        caches[p] = cache
    # The same cache object for every row of a prompt: BatchGenerator only reads it (merging
    # copies its filled part into the batch cache), so no per-row copy of its 256-slot
    # buffers is made (tests/test_rollouts.py pins the tokens against the per-row prefill).
    return [[p[-1]] for p in prompts], [caches[tuple(p)] for p in prompts]


def sample(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
           params: SamplingParams, seed: int | Sequence[int],
           eos_ids: Sequence[int]) -> list[Completion]:
    """One :class:`Completion` per prompt, in order (see ``Backend.sample``); ``seed`` is one
    seed for the call or one per prompt.

    At most ``params.batch_size`` sequences (all when 0) hold a KV cache at any time. The model
    is put in eval mode (no adapter dropout) and its previous mode is restored afterwards.
    """
    from mlx_lm.generate import BatchGenerator

    prompts = check_prompts(prompts)
    if not prompts:
        return []
    if not eos_ids:
        raise ValueError("eos_ids is empty: a completion could only end at max_tokens")
    rows = params.batch_size or len(prompts)
    samplers = None
    if not isinstance(seed, int):
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
        samplers = [FilteredSampler(params, s) for s in seeds]
        seed = 0
    was_training = model.training
    model.eval()
    watch = StopStringWatch(tokenizer, params.stop)
    generator = BatchGenerator(
        model, max_tokens=params.max_tokens, stop_tokens=[[int(e)] for e in eos_ids],
        sampler=FilteredSampler(params, seed), completion_batch_size=rows,
        prefill_batch_size=rows,
    )
    try:
        shared = shared_prefill(model, prompts)
        uids = generator.insert(shared[0], caches=shared[1], samplers=samplers) if shared \
            else generator.insert(prompts, samplers=samplers)
        sampled: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            stopped = []
            for r in responses:
                sampled[r.uid].append(int(r.token))
                if r.finish_reason is None and watch and watch.seen(sampled[r.uid]):
                    stopped.append(r.uid)
            if stopped:
                generator.remove(stopped)
    finally:
        generator.close()
        model.train(was_training)
    return [finish(sampled[uid], tokenizer, params, eos_ids) for uid in uids]
