"""The online loop: rollout -> score -> advantage estimator -> update, for every online preset.

A generation batch (``prompts_per_step * num_generations`` completions) is sampled and scored
(:mod:`algorithms.rl.rollouts`), passed through the no-grad passes its options need and the
advantage estimator (:mod:`algorithms.rl.prepass`), then serves ``steps_per_generation`` =
``num_iterations`` x ``num_mini_batches`` optimiser steps (:func:`algorithms.rl.batches.
mini_batches`), each accumulated in micro-batches of ``batch_size`` completions. On-policy
(one step per generation batch) no old log-probs are computed: ``old = stop_gradient(logp)``
makes the ratio exactly 1.

Across processes (:mod:`algorithms.distributed`) every rank holds the whole generation batch
(sampled and scored by shares, then gathered) and trains on its share of each mini-batch; the
denominators are the mini-batch's, so N ranks equal one process.

Checkpoints are written at generation-batch boundaries only (a checkpoint never has to hold a
half-used batch), so ``--save-every`` rounds up to whole generation batches. Sampling seeds are
a function of (seed, step, round) and the prompt order of (seed, epoch): a resumed run samples
the same prompts with the same seeds as an uninterrupted one. Metrics, timing, checkpoints and
resume are the spine's (:mod:`algorithms.spine`), as for the offline loop.

What a generation batch is comes from a pipeline (:class:`PolicyGradient` here; online DPO,
XPO and Nash-MD bring :class:`algorithms.online_preference.pipeline.PairPipeline`, GKD its own):
``scorer(cfg, data, backend)``, ``rollout(cfg, backend, stream, scorer, step, pad_id) ->
(batch, stats)`` with ``len(batch)`` units (rows, or pairs) that ``batch.micro_batches(units,
batch_size)`` cuts, ``write_samples(cfg, run_dir, step, batch)``, ``evaluate(cfg, backend,
dataset, scorer, step)`` and optionally ``no_gradient_expected(cfg, batch)`` (a zero gradient
is then no collapse for the divergence guard). The loop around it is the same for all.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..backend import Loss
from ..data.dataset import pad_token_id
from ..guards import UnscoredGuard
from ..schedule import learning_rate
from ..spine import Cursor, Run, TrainResult
from .advantages import nan_mean_std
from .batches import RolloutBatch, mini_batches
from .data import PromptStream
from .prepass import prepare_batch
from .rollouts import generate, reward_view, round_seed, sample_and_score
from .scoring import build_scorer


def total_steps(cfg: Any, n_prompts: int) -> int:
    if cfg.steps:
        return cfg.steps
    generations = max(1, math.ceil(cfg.epochs * n_prompts / cfg.prompts_per_step))
    return generations * cfg.steps_per_generation


class PolicyGradient:
    """The pipeline of the GRPO family, RLOO, REINFORCE++ and PPO: groups of completions,
    rewards, the no-grad passes and the advantage estimator (module docstring)."""

    def scorer(self, cfg: Any, data: Any, backend: Any) -> Any:
        return build_scorer(cfg, data.extras["rewards"], backend)

    def rollout(self, cfg: Any, backend: Any, stream: PromptStream, scorer: Any, step: int,
                pad_id: int) -> tuple[RolloutBatch, dict[str, float]]:
        return prepare_batch(cfg, backend, generate(cfg, backend, stream, scorer, step), pad_id)

    def write_samples(self, cfg: Any, run_dir: Path, step: int, batch: RolloutBatch) -> None:
        write_completions(run_dir, step, batch, cfg.num_generations)

    def evaluate(self, cfg: Any, backend: Any, dataset: Any, scorer: Any, step: int) -> dict:
        return evaluate_rewards(cfg, backend, dataset, scorer, step)

    def no_gradient_expected(self, cfg: Any, batch: RolloutBatch) -> bool:
        """Every advantage is 0 and no other term (KL loss, value loss, entropy bonus) remains,
        so a zero gradient norm is expected, not a collapse."""
        advantages = batch.row_values.get("advantages", batch.token_values.get("advantages"))
        other_terms = (cfg.beta > 0 and cfg.kl_penalty == "loss") or cfg.uses_value_head \
            or cfg.entropy_coef > 0
        return not np.any(advantages) and not other_terms


def train(cfg: Any, backend: Any, loss: Loss, data: Any, run_dir: Path,
          pipeline: Any = None) -> TrainResult:
    pipeline = PolicyGradient() if pipeline is None else pipeline
    scorer = pipeline.scorer(cfg, data, backend)
    pad_id = pad_token_id(backend.tokenizer)
    per_generation = cfg.steps_per_generation
    with Run(cfg, backend, run_dir, total_steps(cfg, len(data.train))) as run:
        stream = PromptStream(data.train, cfg.seed, run.cursor.epoch, run.cursor.index)
        batch, schedule, stats = None, [], {}
        # a pipeline without rewards (GKD) has no scorer and nothing to go unscored
        unscored = None if scorer is None else UnscoredGuard(cfg.unscored_patience, scorer.names)
        while not run.done:
            k = run.step % per_generation
            if k == 0 or batch is None:
                batch, stats = pipeline.rollout(cfg, backend, stream, scorer, run.step, pad_id)
                if unscored is not None:
                    unscored.check(run.step + 1, batch.rollouts.total)
                no_signal = pipeline.no_gradient_expected(cfg, batch) \
                    if hasattr(pipeline, "no_gradient_expected") else False
                schedule = mini_batches(len(batch), cfg, run.step)
                if cfg.log_completions_every and run.step % cfg.log_completions_every == 0 \
                        and run.world.main:
                    pipeline.write_samples(cfg, run.run_dir, run.step, batch)
            lr = learning_rate(run.step, run.n_steps, cfg.learning_rate, cfg.lr_schedule,
                               cfg.warmup_steps, cfg.min_lr_ratio)
            start = time.perf_counter()
            micro = [arrays for _, arrays in batch.micro_batches(schedule[k], cfg.batch_size,
                                                                  run.world)]
            metrics, tokens = distributed.combine(
                [backend.forward_backward(a, loss) for a in micro],
                [float(a["micro_fraction"]) for a in micro],
                sum(int((a["segment_ids"] > 0).sum()) for a in micro))
            grad_norm = backend.optimizer_step(lr, cfg.max_grad_norm)
            metrics["time/update"] = time.perf_counter() - start
            run.record({**stats, **metrics}, lr=lr, grad_norm=grad_norm, tokens=tokens,
                       epoch=stream.fractional_epoch, zero_grad_expected=no_signal)
            stats = {}  # logged once per generation batch
            if data.valid is not None and run.due(cfg.eval_every):
                run.write_eval(pipeline.evaluate(cfg, backend, data.valid, scorer, run.step))
            if run.step % per_generation == 0 and _save_due(cfg, run):
                run.save(Cursor(stream.epoch, stream.index))
        if data.valid is not None:
            run.write_eval(pipeline.evaluate(cfg, backend, data.valid, scorer, run.step))
        if getattr(data, "test", None) is not None:
            run.write_eval(pipeline.evaluate(cfg, backend, data.test, scorer, run.step), "test")
        return run.finish(Cursor(stream.epoch, stream.index))


def _save_due(cfg: Any, run: Run) -> bool:
    """``--save-every`` counted in whole generation batches (rounded up), before the end."""
    if not cfg.save_every or run.done:
        return False
    period = max(1, math.ceil(cfg.save_every / cfg.steps_per_generation))
    return (run.step // cfg.steps_per_generation) % period == 0


def evaluate_rewards(cfg: Any, backend: Any, dataset: Any, scorer: Any, step: int) -> dict:
    """Mean rewards of one sampled completion per validation prompt (fixed seeds, so steps
    are compared on the same draws), up to ``eval_batches * prompts_per_step`` prompts
    (distributed: sampled and scored by shares, then gathered)."""
    examples = list(dataset.examples)
    if cfg.eval_batches:
        examples = examples[:cfg.eval_batches * cfg.prompts_per_step]
    completions, per_function, total, _ = sample_and_score(
        cfg, backend, scorer, examples, 1, round_seed(cfg.seed, -1, 0), step)
    record = {"reward": nan_mean_std(total)[0],
              "completions/mean_length": float(np.mean([len(c.ids) for c in completions]))}
    for name, values in per_function.items():
        record[f"rewards/{name}/mean"] = nan_mean_std(values)[0]
    return record


def write_completions(run_dir: Path, step: int, batch: RolloutBatch, group: int,
                      n_groups: int = 2) -> None:
    """Append the first ``n_groups`` groups (prompt, completion, rewards, advantage: the mean
    over the completion's tokens when advantages are per token) to
    ``<run_dir>/completions.jsonl``."""
    rollouts = batch.rollouts
    advantages = batch.row_values.get("advantages")
    if advantages is None:
        token = batch.token_values["advantages"]
        counts = np.maximum(batch.completion_mask.sum(axis=1), 1)
        advantages = (token * batch.completion_mask).sum(axis=1) / counts
    with open(run_dir / "completions.jsonl", "a") as handle:
        for i in range(min(len(rollouts), n_groups * group)):
            example, completion = rollouts.examples[i], rollouts.completions[i]
            handle.write(json.dumps({
                "step": step, "source": example.source, "prompt": example.prompt,
                "completion": reward_view(example, completion),
                "finish_reason": completion.finish_reason,
                "rewards": {k: _json_float(v[i]) for k, v in rollouts.rewards.items()},
                "reward": _json_float(rollouts.total[i]),
                "advantage": float(advantages[i]),
            }, ensure_ascii=False) + "\n")


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
