"""The one training loop, shared by every algorithm and backend.

It owns data order, gradient accumulation, the learning-rate schedule, evaluation, metrics and
checkpoint cadence; the backend owns the model and the update; the algorithm owns the loss
(passed in as a function, never looked up by name here).

Micro-batches form one stream across epochs: ``(epoch, index)`` is the data cursor, and an
optimiser step takes the next ``grad_accumulation_steps`` micro-batches from it. Every
micro-batch of a step is divided by the same ``num_items`` (loss tokens in the whole step), so
accumulation changes nothing but memory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .data import BatchPlan
from .guards import DivergenceGuard
from .metrics import MetricsLog
from .schedule import learning_rate


@dataclasses.dataclass
class Cursor:
    epoch: int = 0
    index: int = 0


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_train_loss: float | None
    final_valid_loss: float | None
    run_dir: Path
    sample: str | None = None


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
    to the mean over the step. ``prepare(backend, arrays, b, plan)`` adds what a loss needs beyond the
    policy's log-probs (reference log-probs, KL pairs...); ``b`` is the plan's batch
    (which examples of ``plan.dataset`` the rows hold).
    """
    arrays = [plan.collate(b) for b in batches]
    tokens = [float(a["loss_mask"].sum()) for a in arrays]
    weights = tokens if normaliser == "tokens" else [float(len(a["input_ids"])) for a in arrays]
    total = max(sum(weights), 1e-12)
    for a, w, b in zip(arrays, weights, batches):
        a["num_items"] = np.float32(max(1.0, sum(tokens)))
        a["micro_fraction"] = np.float32(w / total)
        if prepare is not None:
            prepare(backend, a, b, plan)
    return arrays, [w / total for w in weights]


def combine(metrics: list[dict[str, float]], fractions: list[float]) -> dict[str, float]:
    """One step's metrics: ``loss`` summed (micro losses are already scaled), others averaged."""
    out = {"loss": sum(m["loss"] for m in metrics)}
    for key in metrics[0]:
        if key != "loss":
            out[key] = sum(f * m[key] for f, m in zip(fractions, metrics))
    return out


def evaluate(backend: Any, loss_fn: Any, plan: BatchPlan | None, max_batches: int,
             prepare: Any = None, normaliser: str = "tokens") -> dict[str, float] | None:
    """Validation metrics over the whole set (or its first ``max_batches``), each batch weighted
    by its tokens (or rows), so ``loss`` is the token (or sequence) mean over the set."""
    if plan is None:
        return None
    batches = plan.batches(0)[:max_batches or None]
    results, weights = [], []
    for b in batches:
        (arrays,), _ = collate_step(plan, [b], backend, prepare, normaliser)
        results.append(backend.evaluate(arrays, loss_fn))
        weights.append(float(arrays["loss_mask"].sum()) if normaliser == "tokens"
                       else float(len(arrays["input_ids"])))
    if not results or not sum(weights):
        return None
    return {k: sum(w * r[k] for w, r in zip(weights, results)) / sum(weights) for k in results[0]}


def train(cfg: Any, backend: Any, loss_fn: Any, train_plan: BatchPlan,
          valid_plan: BatchPlan | None, run_dir: Path, prepare: Any = None,
          normaliser: str = "tokens") -> TrainResult:
    run_dir = Path(run_dir)
    n_steps = total_steps(cfg, train_plan.num_batches)
    step, cursor = 0, Cursor()
    if cfg.resume:
        step, cursor = resume(cfg, backend, run_dir)
    log = MetricsLog(run_dir, n_steps, step, cfg.progress)
    stream = micro_batch_stream(train_plan, cursor)
    window = _Window()
    guard = DivergenceGuard(cfg)  # stops on a NaN/inf loss or a collapsed gradient
    last_loss = valid_loss = None

    def run_eval() -> float | None:
        metrics = evaluate(backend, loss_fn, valid_plan, cfg.eval_batches, prepare, normaliser)
        if metrics is None:
            return None
        log.write({"split": "valid", "step": step, **metrics})
        return metrics["loss"]

    try:
        while step < n_steps:
            lr = learning_rate(step, n_steps, cfg.learning_rate, cfg.lr_schedule,
                               cfg.warmup_steps, cfg.min_lr_ratio)
            micro = [next(stream) for _ in range(cfg.grad_accumulation_steps)]
            cursor = micro[-1][0]
            arrays, fractions = collate_step(train_plan, [b for _, b in micro], backend,
                                             prepare, normaliser)
            metrics = combine([backend.forward_backward(a, loss_fn) for a in arrays], fractions)
            window.tokens += sum(int((a["segment_ids"] > 0).sum()) for a in arrays)
            grad_norm = backend.optimizer_step(lr, cfg.max_grad_norm)
            step += 1
            last_loss = metrics["loss"]
            window.add(metrics)
            if step % cfg.log_every == 0 or step == n_steps:
                epoch = cursor.epoch + cursor.index / train_plan.num_batches
                record = window.flush(step, epoch, lr, grad_norm, backend.peak_memory_bytes())
                log.write({**record, **memory_stats(backend)})
            guard.check(step, last_loss, grad_norm)
            log.advance()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < n_steps:
                valid_loss = run_eval()
                window.restart()  # evaluation time is not training time
            if cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                save(cfg, backend, run_dir, step, cursor)
                window.restart()
        valid_loss = run_eval()
        save(cfg, backend, run_dir, step, cursor)
        ckpt.write_atomically(run_dir / "adapters", lambda d: backend.save_adapters(str(d)))
    finally:
        log.close()
    sample = None
    if cfg.sample_prompt:
        sample = backend.generate(cfg.sample_prompt, cfg.sample_max_tokens)
    return TrainResult(step, last_loss, valid_loss, run_dir, sample)


def memory_stats(backend: Any) -> dict[str, float]:
    """Peak memory by kind (``memory/peak_rss_gb``, ``memory/mlx_peak_gb``,
    ``memory/cuda_peak_gb``...) from a backend's optional ``memory_stats()`` (bytes)."""
    stats = getattr(backend, "memory_stats", None)
    if stats is None:
        return {}
    return {f"memory/{kind}_gb": value / 1e9 for kind, value in stats().items()}


class _Window:
    """Accumulates the steps between two log lines; metrics are averaged over them.

    ``step_time`` is the mean wall time of the window's steps (with ``--log-every 1``: each
    step's own time), evaluation and checkpoint time excluded; ``cpu_time`` the process CPU
    time (all threads) per step, which a busy machine distorts less than wall time.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: list[dict[str, float]] = []
        self.tokens = 0
        self.trained_tokens = 0
        self.paused = 0.0
        self.cpu_start, self.cpu_paused = time.process_time(), 0.0

    def restart(self) -> None:
        """Restart the clock (after work that is not training: evaluation, checkpoints)."""
        if self.steps:  # mid-window: keep the time already spent on its steps
            self.paused += time.perf_counter() - self.start
            self.cpu_paused += time.process_time() - self.cpu_start
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def add(self, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)

    def flush(self, step: int, epoch: float, lr: float, grad_norm: float, peak: int) -> dict:
        elapsed = max(time.perf_counter() - self.start + self.paused, 1e-9)
        means = {k: sum(m[k] for m in self.steps) / len(self.steps) for k in self.steps[0]}
        self.trained_tokens += self.tokens
        record = {
            "split": "train", "step": step, "epoch": round(epoch, 4), **means,
            "learning_rate": lr, "grad_norm": grad_norm,
            "tokens_per_second": self.tokens / elapsed, "tokens": self.trained_tokens,
            "step_time": elapsed / len(self.steps),
            "cpu_time": (time.process_time() - self.cpu_start + self.cpu_paused) / len(self.steps),
            "peak_memory_gb": peak / 1e9,
        }
        self.start, self.steps, self.tokens, self.paused = time.perf_counter(), [], 0, 0.0
        self.cpu_start, self.cpu_paused = time.process_time(), 0.0
        return record


def save(cfg: Any, backend: Any, run_dir: Path, step: int, cursor: Cursor) -> None:
    """A checkpoint of the run at ``step`` with its data ``cursor`` (every loop's format)."""
    state = {"step": step, "cursor": dataclasses.asdict(cursor), "config": cfg.to_dict(),
             "backend": backend.name}
    ckpt.save_checkpoint(run_dir, step, backend, state)


def resume(cfg: Any, backend: Any, run_dir: Path) -> tuple[int, Cursor]:
    """Load the newest usable checkpoint into ``backend`` (see
    :func:`checkpoint.resume_from_checkpoint`); its step and data cursor."""
    state = ckpt.resume_from_checkpoint(cfg, backend, run_dir)
    return state["step"], Cursor(**state["cursor"])
