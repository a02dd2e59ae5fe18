"""The offline training loop (SFT and the preference algorithms), for every backend.

It owns data order, gradient accumulation, the learning-rate schedule and evaluation; the
spine (:mod:`algorithms.spine`) owns metrics, timing, checkpoints and resume, as for the online
loop; the backend owns the model and the update; the algorithm owns the loss (passed in, never
looked up by name here).

Micro-batches form one stream across epochs: ``(epoch, index)`` is the data cursor, and an
optimiser step takes the next ``grad_accumulation_steps`` micro-batches from it. Every
micro-batch of a step is divided by the same ``num_items`` (loss tokens in the whole step), so
accumulation changes nothing but memory. Across processes the plan's micro-batch is the global
one (``--batch-size`` x ranks) and each rank trains its share of every micro-batch's rows, the
counts summed over ranks (:mod:`algorithms.distributed`): the ranks change nothing but speed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from .backend import Loss
from .data import BatchPlan
from .schedule import learning_rate
from .spine import Cursor, Run, TrainResult


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

    Distributed, ``batches`` are the step's global micro-batches and ``arrays`` this rank's
    share of each (:func:`algorithms.distributed.shard_batch`; 0 rows when it has none): the
    token and row counts are summed over ranks, so every share is of the GLOBAL step.
    """
    world = distributed.current()
    arrays = [_collate_share(plan, b, world) for b in batches]
    tokens = [float(a["loss_mask"].sum()) for a in arrays]
    weights = tokens if normaliser == "tokens" else [float(len(a["input_ids"])) for a in arrays]
    step_tokens, step_weight = world.all_sum([sum(tokens), sum(weights)])
    total = max(float(step_weight), 1e-12)
    for a, w in zip(arrays, weights):
        a["num_items"] = np.float32(max(1.0, float(step_tokens)))
        a["micro_fraction"] = np.float32(w / total)
    if prepare is not None:
        prepare(backend, arrays, batches, plan)
    return arrays, [w / total for w in weights]


def _collate_share(plan: Any, batch: Any, world: Any) -> dict[str, np.ndarray]:
    """This rank's rows of ``batch``, collated; KTO's micro-batch KL rows are not built (the
    ``prepare`` hook gives every micro-batch the step-wide estimate instead)."""
    share = distributed.shard_batch(batch, world)
    options = {"kl": False} if getattr(plan, "kl", False) else {}
    if not share.rows:  # more ranks than rows: an empty share of the same layout
        return distributed.empty_like(plan.collate(type(batch)(batch.rows[:1]), **options))
    return plan.collate(share, **options)


def evaluate(backend: Any, loss: Loss, plan: BatchPlan | None, max_batches: int,
             prepare: Any = None, normaliser: str = "tokens") -> dict[str, float] | None:
    """Validation metrics over the whole set (or its first ``max_batches``), each batch weighted
    by its tokens (or rows), so ``loss`` is the token (or sequence) mean over the set.

    Distributed, each rank evaluates its share of every batch; a share's loss is its part of
    the batch loss (``micro_fraction``), so it is weighted by the whole batch's weight."""
    if plan is None:
        return None
    batches = plan.batches(0)[:max_batches or None]
    sums: dict[str, float] = {}
    weight = 0.0
    for b in batches:
        (arrays,), (share,) = collate_step(plan, [b], backend, prepare, normaliser)
        result = backend.evaluate(arrays, loss)
        w = float(arrays["loss_mask"].sum()) if normaliser == "tokens" \
            else float(len(arrays["input_ids"]))
        if not result or not w:
            continue
        for key, value in result.items():  # loss: (w / share) = the whole batch's weight
            sums[key] = sums.get(key, 0.0) + (w / share if key == "loss" else w) * value
        weight += w
    parts = distributed.current().gather((sums, weight))
    weight = sum(w for _, w in parts)
    if not weight:
        return None
    keys = dict.fromkeys(k for part, _ in parts for k in part)
    return {k: sum(part.get(k, 0.0) for part, _ in parts) / weight for k in keys}


def train(cfg: Any, backend: Any, loss: Loss, train_plan: BatchPlan,
          valid_plan: BatchPlan | None, run_dir: Path, prepare: Any = None,
          normaliser: str = "tokens", test_plan: BatchPlan | None = None,
          state: Any = None) -> TrainResult:
    from .evaluation import offline_metrics

    def run_eval(plan: BatchPlan | None = valid_plan) -> dict | None:
        return offline_metrics(cfg, backend, loss, plan, prepare, normaliser)

    with Run(cfg, backend, run_dir, total_steps(cfg, train_plan.num_batches), state) as run:
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
            metrics, tokens = distributed.combine(
                [backend.forward_backward(a, loss) for a in arrays], fractions,
                sum(int((a["segment_ids"] > 0).sum()) for a in arrays))
            seconds["time/forward_backward"] = time.perf_counter() - start
            start = time.perf_counter()
            grad_norm = backend.optimizer_step(lr, cfg.max_grad_norm)
            seconds["time/optimizer"] = time.perf_counter() - start
            run.record({**metrics, **seconds}, lr=lr, grad_norm=grad_norm, tokens=tokens,
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
