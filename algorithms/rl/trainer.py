"""The online RL loop (GRPO family): generate -> score -> advantages -> ``num_iterations`` updates.

One optimiser step uses one whole generation batch (``prompts_per_step * num_generations``
completions), accumulated in micro-batches of ``batch_size`` completions; the rollout batch
(``rollout_batch_size`` sequences sampled at once) is a separate memory knob. A generation batch
serves ``num_iterations`` (mu) consecutive steps; from the second on, the policy has moved, so the
ratio ``pi / pi_old`` departs from 1 and clipping acts. With mu = 1 no ``old_logps`` are computed:
``old = stop_gradient(logp)`` makes the ratio exactly 1 (ALGORITHMS.md 9.1).

Per generation batch, before the first update and without gradients: the policy's entropy (a
metric), ``old_logps`` when mu > 1, and the reference's log-probs when ``beta`` > 0 (LoRA: the
base with adapters disabled; full: a frozen copy; ``--ref-model``). Every log-prob is taken at
the sampling temperature.

Checkpoints are written at generation-batch boundaries only (a checkpoint never has to hold a
half-used batch), so ``--save-every`` rounds up to a multiple of mu. Sampling seeds are a
function of (seed, step, round) and the prompt order of (seed, epoch): a resumed run samples
the same prompts with the same seeds as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint as ckpt
from ..data.dataset import pad_token_id
from ..guards import DivergenceGuard, UnscoredGuard
from ..loop import Cursor, TrainResult, combine, memory_stats, resume, save
from ..metrics import MetricsLog
from ..schedule import learning_rate
from .advantages import nan_mean_std
from .batches import micro_batches
from .data import PromptStream
from .rollouts import Rollouts, generate, reward_view, round_seed, sampling_params, score
from .scoring import build_scorer


def total_steps(cfg: Any, n_prompts: int) -> int:
    if cfg.steps:
        return cfg.steps
    generations = max(1, math.ceil(cfg.epochs * n_prompts / cfg.prompts_per_step))
    return generations * cfg.num_iterations


def train(cfg: Any, backend: Any, loss_fn: Any, data: Any, run_dir: Path,
          prepare: Any = None, normaliser: str = "rows") -> TrainResult:
    run_dir = Path(run_dir)
    scorer = build_scorer(cfg, data.extras["rewards"], backend)
    pad_id = pad_token_id(backend.tokenizer)
    n_steps = total_steps(cfg, len(data.train))
    step, stream = 0, PromptStream(data.train, cfg.seed)
    if cfg.resume:
        step, stream = _resume(cfg, backend, run_dir, data.train)
    log = MetricsLog(run_dir, n_steps, step, cfg.progress)
    window: list[dict[str, float]] = []
    window_start, window_tokens = time.perf_counter(), 0
    arrays: list[dict] = []
    rollout_stats: dict[str, float] = {}
    last_loss = None
    guard, unscored = DivergenceGuard(cfg), UnscoredGuard(cfg.unscored_patience, scorer.names)
    try:
        while step < n_steps:
            if step % cfg.num_iterations == 0:
                rollouts = generate(cfg, backend, stream, scorer, step)
                unscored.check(step + 1, rollouts.total)
                arrays, rollout_stats = _prepare_batches(cfg, backend, rollouts, pad_id)
                if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                    _write_completions(run_dir, step, rollouts, cfg.num_generations)
            lr = learning_rate(step, n_steps, cfg.learning_rate, cfg.lr_schedule,
                               cfg.warmup_steps, cfg.min_lr_ratio)
            start = time.perf_counter()
            fractions = [float(a["micro_fraction"]) for a in arrays]
            metrics = combine([backend.forward_backward(a, loss_fn) for a in arrays], fractions)
            grad_norm = backend.optimizer_step(lr, cfg.max_grad_norm)
            metrics["time/update"] = time.perf_counter() - start
            step += 1
            last_loss = metrics["loss"]
            window.append({**rollout_stats, **metrics, "grad_norm": grad_norm})
            rollout_stats = {}  # logged once per generation batch
            window_tokens += sum(int((a["segment_ids"] > 0).sum()) for a in arrays)
            if step % cfg.log_every == 0 or step == n_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                log.write({"split": "train", "step": step,
                           "epoch": round(stream.fractional_epoch, 4), **_mean(window),
                           "learning_rate": lr, "tokens_per_second": window_tokens / elapsed,
                           "step_time": elapsed / len(window),
                           "peak_memory_gb": backend.peak_memory_bytes() / 1e9,
                           **memory_stats(backend)})
                window, window_start, window_tokens = [], time.perf_counter(), 0
            # no gradient by construction: every advantage 0 and no KL term
            guard.check(step, last_loss, grad_norm,
                        zero_grad_expected=cfg.beta == 0 and not np.any(rollouts.advantages))
            log.advance()
            at_boundary = step % cfg.num_iterations == 0
            if data.valid is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step < n_steps:
                log.write(evaluate_rewards(cfg, backend, data.valid, scorer, step))
            if cfg.save_every and at_boundary and step < n_steps \
                    and (step // cfg.num_iterations) % _save_period(cfg) == 0:
                _save(cfg, backend, run_dir, step, stream)
        if data.valid is not None:
            log.write(evaluate_rewards(cfg, backend, data.valid, scorer, step))
        _save(cfg, backend, run_dir, step, stream)
        ckpt.write_atomically(run_dir / "adapters", lambda d: backend.save_adapters(str(d)))
    finally:
        log.close()
    sample = backend.generate(cfg.sample_prompt, cfg.sample_max_tokens) \
        if cfg.sample_prompt else None
    return TrainResult(step, last_loss, None, run_dir, sample)


def _prepare_batches(cfg: Any, backend: Any, rollouts: Rollouts,
                     pad_id: int) -> tuple[list[dict], dict[str, float]]:
    """Micro-batch arrays with what the loss needs beyond the policy's own log-probs."""
    start = time.perf_counter()
    arrays = micro_batches(rollouts, cfg, pad_id)
    entropy_sum = mask_sum = 0.0
    for a in arrays:
        mask = a["loss_mask"]
        entropy_sum += float((backend.per_token_entropy(a) * mask).sum())
        mask_sum += float(mask.sum())
        if cfg.num_iterations > 1:
            a["old_logps"] = backend.per_token_logps(a)
        if cfg.beta > 0:
            a["ref_logps"] = backend.reference_per_token_logps(a)
    stats = dict(rollouts.stats)
    stats["entropy"] = entropy_sum / mask_sum if mask_sum else float("nan")
    stats["time/logps"] = time.perf_counter() - start
    generated = sum(len(c.ids) for c in rollouts.completions)
    stats["generation/tokens_per_second"] = generated / max(stats["time/generation"], 1e-9)
    return arrays, stats


def evaluate_rewards(cfg: Any, backend: Any, dataset: Any, scorer: Any, step: int) -> dict:
    """Mean rewards of one sampled completion per validation prompt (a fixed seed, so steps
    are compared on the same draws), up to ``eval_batches * prompts_per_step`` prompts."""
    examples = dataset.examples
    if cfg.eval_batches:
        examples = examples[:cfg.eval_batches * cfg.prompts_per_step]
    completions = backend.sample([e.prompt_ids for e in examples], sampling_params(cfg),
                                 round_seed(cfg.seed, -1, 0))
    scores = score(scorer, examples, completions, step)
    record = {"split": "valid", "step": step, "reward": nan_mean_std(scores.total)[0],
              "completions/mean_length": float(np.mean([len(c.ids) for c in completions]))}
    for name, values in scores.per_function.items():
        record[f"rewards/{name}/mean"] = nan_mean_std(values)[0]
    return record


def _mean(window: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over the steps of the window that logged it."""
    keys = dict.fromkeys(k for m in window for k in m)
    return {k: float(np.mean([m[k] for m in window if k in m])) for k in keys}


def _write_completions(run_dir: Path, step: int, rollouts: Rollouts, group: int,
                       n_groups: int = 2) -> None:
    """Append the first ``n_groups`` groups (prompt, completion, rewards, advantage) to
    ``<run_dir>/completions.jsonl``."""
    with open(run_dir / "completions.jsonl", "a") as handle:
        for i in range(min(len(rollouts), n_groups * group)):
            example, completion = rollouts.examples[i], rollouts.completions[i]
            handle.write(json.dumps({
                "step": step, "source": example.source, "prompt": example.prompt,
                "completion": reward_view(example, completion),
                "finish_reason": completion.finish_reason,
                "rewards": {k: _json_float(v[i]) for k, v in rollouts.rewards.items()},
                "reward": _json_float(rollouts.total[i]),
                "advantage": float(rollouts.advantages[i]),
            }, ensure_ascii=False) + "\n")


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _save_period(cfg: Any) -> int:
    """``--save-every`` in generation batches (rounded up to whole batches)."""
    return max(1, math.ceil(cfg.save_every / cfg.num_iterations))


def _save(cfg: Any, backend: Any, run_dir: Path, step: int, stream: PromptStream) -> None:
    save(cfg, backend, run_dir, step, Cursor(stream.epoch, stream.index))


def _resume(cfg: Any, backend: Any, run_dir: Path, dataset: Any) -> tuple[int, PromptStream]:
    step, cursor = resume(cfg, backend, run_dir)
    return step, PromptStream(dataset, cfg.seed, cursor.epoch, cursor.index)
