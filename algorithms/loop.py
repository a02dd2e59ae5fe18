"""The offline training loop (SFT and the preference algorithms), for every backend.

It owns data order, gradient accumulation, the learning-rate schedule and evaluation; the
spine (:mod:`algorithms.spine`) owns metrics, timing, checkpoints and resume, as for the online
loop; the backend owns the model and the update; the algorithm owns the loss (passed in, never
looked up by name here).

Micro-batches form one stream across epochs: ``(epoch, index)`` is the data cursor, and an
optimiser step takes the next ``grad_accumulation_steps`` micro-batches from it. Every
micro-batch of a step is divided by the same ``num_items`` (loss tokens in the whole step), so
accumulation changes nothing but memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Loss
from .data import BatchPlan
from .schedule import learning_rate
from .spine import Cursor, Run, TrainResult, combine


def total_steps(cfg: Any, micro_batches_per_epoch: int) -> int:
    if cfg.steps:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * micro_batches_per_epoch / cfg.grad_accumulation_steps))


def micro_batch_stream(plan: BatchPlan, cursor: Cursor) -> Iterator[tuple[Cursor, Any]]:
    """Yield (cursor after this micro-batch, batch) forever, epoch after epoch."""
    epoch, index = cursor.epoch, cursor.index
    while True:
        batches = plan.batches(epoch)
        while index < len(batches):
            batch = batches[index]
            index += 1
            yield Cursor(epoch, index), batch
        epoch, index = epoch + 1, 0


def collate_step(plan: BatchPlan, batches: list, backend: Any, prepare: Any = None,
                 normaliser: str = "tokens") -> tuple[list[dict], list[float]]:
    """Collate the micro-batches of one optimiser step and give each its share of the step.

    ``num_items`` = loss tokens in the whole step (the SFT denominator); ``micro_fraction`` =
    this micro-batch's share of the step's weight (tokens, or rows for losses that average over
    sequences/pairs), so a loss that is a mean over its micro-batch, scaled by its fraction, sums
    to the mean over the step. ``prepare(backend, arrays, batches, plan)`` then adds what the
    loss needs beyond the policy's outputs (reference log-probs, a step-wide KL estimate...);
    ``batches`` say which examples of ``plan.dataset`` each micro-batch holds.
    """
    arrays = [plan.collate(b) for b in batches]
    tokens = [float(a["loss_mask"].sum()) for a in arrays]
    weights = tokens if normaliser == "tokens" else [float(len(a["input_ids"])) for a in arrays]
    total = max(sum(weights), 1e-12)
    for a, w in zip(arrays, weights):
        a["num_items"] = np.float32(max(1.0, sum(tokens)))
        a["micro_fraction"] = np.float32(w / total)
    if prepare is not None:
        prepare(backend, arrays, batches, plan)
    return arrays, [w / total for w in weights]


def evaluate(backend: Any, loss: Loss, plan: BatchPlan | None, max_batches: int,
             prepare: Any = None, normaliser: str = "tokens") -> dict[str, float] | None:
    """Validation metrics over the whole set (or its first ``max_batches``), each batch weighted
    by its tokens (or rows), so ``loss`` is the token (or sequence) mean over the set."""
    if plan is None:
        return None
    batches = plan.batches(0)[:max_batches or None]
    results, weights = [], []
    for b in batches:
        (arrays,), _ = collate_step(plan, [b], backend, prepare, normaliser)
        results.append(backend.evaluate(arrays, loss))
        weights.append(float(arrays["loss_mask"].sum()) if normaliser == "tokens"
                       else float(len(arrays["input_ids"])))
    if not results or not sum(weights):
        return None
    return {k: sum(w * r[k] for w, r in zip(weights, results)) / sum(weights) for k in results[0]}


def train(cfg: Any, backend: Any, loss: Loss, train_plan: BatchPlan,
          valid_plan: BatchPlan | None, run_dir: Path, prepare: Any = None,
          normaliser: str = "tokens", test_plan: BatchPlan | None = None) -> TrainResult:
    from .evaluation import offline_metrics

    def run_eval(plan: BatchPlan | None = valid_plan) -> dict | None:
        return offline_metrics(cfg, backend, loss, plan, prepare, normaliser)

    with Run(cfg, backend, run_dir, total_steps(cfg, train_plan.num_batches)) as run:
        stream = micro_batch_stream(train_plan, run.cursor)
        cursor = run.cursor
        valid = None
        while not run.done:
            lr = learning_rate(run.step, run.n_steps, cfg.learning_rate, cfg.lr_schedule,
                               cfg.warmup_steps, cfg.min_lr_ratio)
            micro = [next(stream) for _ in range(cfg.grad_accumulation_steps)]
            cursor = micro[-1][0]
            start = time.perf_counter()
            arrays, fractions = collate_step(train_plan, [b for _, b in micro], backend,
                                             prepare, normaliser)
            # where the step's seconds go: the reference pass (prepare), forward + backward
            # (one graph on a lazy backend), the optimiser
            seconds = {"time/reference": time.perf_counter() - start} if prepare else {}
            start = time.perf_counter()
            metrics = combine([backend.forward_backward(a, loss) for a in arrays], fractions)
            seconds["time/forward_backward"] = time.perf_counter() - start
            start = time.perf_counter()
            grad_norm = backend.optimizer_step(lr, cfg.max_grad_norm)
            seconds["time/optimizer"] = time.perf_counter() - start
            run.record({**metrics, **seconds}, lr=lr, grad_norm=grad_norm,
                       tokens=sum(int((a["segment_ids"] > 0).sum()) for a in arrays),
                       epoch=cursor.epoch + cursor.index / train_plan.num_batches)
            if run.due(cfg.eval_every):
                run.write_eval(run_eval())
            if run.due(cfg.save_every):
                run.save(cursor)
        valid = run_eval()
        run.write_eval(valid)
        if test_plan is not None:
            run.write_eval(run_eval(test_plan), "test")
        return run.finish(cursor, valid["loss"] if valid else None)
