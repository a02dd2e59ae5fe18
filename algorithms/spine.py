"""What every training loop shares: step bookkeeping, timing, metrics, checkpoints, resume.

The offline loop (:mod:`algorithms.loop`) and the online one (:mod:`algorithms.rl.trainer`)
differ in where a step's data comes from; everything around the step is here, once:

- :class:`Run` opens the metrics log, resumes from the latest checkpoint (``--resume``),
  records each optimiser step (loss finite or the run stops, a timing window averaged over
  ``--log-every`` steps with wall and CPU time, tokens/s, peak memory by kind), writes
  evaluation records, checkpoints, and at the end the final checkpoint and the adapters.
- A checkpoint holds the backend's state plus the step, the data cursor and the resolved
  config (:mod:`algorithms.checkpoint`); a resumed run continues bit for bit.
- Algorithm state that lives across steps outside the model (BCO's running reward mean) is an
  object with ``state_dict() -> dict`` (JSON) and ``load_state_dict(dict)``, handed to
  :class:`Run` as ``state``: it is saved in every checkpoint (``algorithm_state`` in
  ``trainer_state.json``) and restored on resume.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from .distributed import current
from .guards import DivergenceGuard
from .metrics import MetricsLog, NullLog


@dataclasses.dataclass
class Cursor:
    """Where the data stream stands: ``index`` items into epoch ``epoch``."""

    epoch: int = 0
    index: int = 0


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_train_loss: float | None
    final_valid_loss: float | None
    run_dir: Path
    sample: str | None = None
    test: dict | None = None  # the test split's metrics, when the data has one


class Run:
    """One training run's bookkeeping (see the module docstring). Use as a context manager:
    the metrics log is closed whatever happens."""

    def __init__(self, cfg: Any, backend: Any, run_dir: Path, n_steps: int,
                 state: Any = None):
        self.cfg, self.backend, self.run_dir = cfg, backend, Path(run_dir)
        self.world = current()  # several processes: rank 0 alone writes (algorithms.distributed)
        self.n_steps, self.state = n_steps, state
        self.step, self.cursor = 0, Cursor()
        if cfg.resume:
            self.step, self.cursor = resume(cfg, backend, self.run_dir, state)
        from .tracking import make_trackers

        self.log = MetricsLog(self.run_dir, n_steps, self.step, cfg.progress,
                              make_trackers(cfg, self.run_dir)) if self.world.main else NullLog()
        self.window = Window()
        self.guard = DivergenceGuard(cfg)  # stops on a NaN/inf loss or a collapsed gradient
        self.last_loss: float | None = None
        self.test: dict | None = None

    def __enter__(self) -> Run:  # noqa: PYI034 (the class is not subclassed)
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps

    def record(self, metrics: dict[str, float], *, lr: float, grad_norm: float, tokens: int,
               epoch: float, zero_grad_expected: bool = False) -> None:
        """One optimiser step is done: count it, log at ``--log-every``, then stop the run if
        it diverged or its gradient collapsed (:class:`algorithms.guards.DivergenceGuard`;
        ``zero_grad_expected``: this step's loss has no gradient by construction)."""
        self.step += 1
        self.last_loss = metrics["loss"]
        self.window.add({**metrics, "learning_rate": lr, "grad_norm": grad_norm}, tokens)
        if self.step % self.cfg.log_every == 0 or self.done:
            record = self.window.flush()
            self.log.write({"split": "train", "step": self.step, "epoch": round(epoch, 4),
                            **record, "peak_memory_gb": self.backend.peak_memory_bytes() / 1e9,
                            **memory_stats(self.backend)})
        self.guard.check(self.step, self.last_loss, grad_norm, zero_grad_expected)
        self.log.advance()

    def due(self, every: int) -> bool:
        """Whether a periodic action (``every`` steps; 0 = never) falls on this step, before
        the end (the end has its own)."""
        return bool(every) and self.step % every == 0 and not self.done

    def write_eval(self, record: dict | None, split: str = "valid") -> None:
        """Log an evaluation record (evaluation time is not training time); the test split's
        is kept for the result."""
        if record is not None:
            self.log.write({"split": split, "step": self.step, **record})
            if split == "test":
                self.test = record
        self.window.restart()

    def save(self, cursor: Cursor) -> None:
        """A checkpoint of the run at this step with its data ``cursor``."""
        self.cursor = cursor
        state = {"step": self.step, "cursor": dataclasses.asdict(cursor),
                 "config": self.cfg.to_dict(), "backend": self.backend.name,
                 "world_size": self.world.size}
        if self.state is not None:
            state["algorithm_state"] = self.state.state_dict()
        ckpt.save_checkpoint(self.run_dir, self.step, self.backend, state, self.world)
        self.window.restart()

    def finish(self, cursor: Cursor, valid_loss: float | None = None) -> TrainResult:
        """The final checkpoint and the adapters (then the ``--sample-prompt`` reply)."""
        self.save(cursor)
        if self.world.main:
            ckpt.write_atomically(self.run_dir / "adapters",
                                  lambda d: self.backend.save_adapters(str(d)))
        else:  # takes part in the collectives (FSDP2 gathers the shards); writes nothing
            self.backend.save_adapters(None)
        self.world.barrier()
        sample = None
        if self.cfg.sample_prompt:
            sample = self.backend.generate(self.cfg.sample_prompt, self.cfg.sample_max_tokens)
        return TrainResult(self.step, self.last_loss, valid_loss, self.run_dir, sample,
                           self.test)


class Window:
    """The steps between two log lines; each metric is averaged over the steps that logged it.

    ``step_time`` is the mean wall time of the window's steps (with ``--log-every 1``: each
    step's own time), evaluation and checkpoint time excluded; ``cpu_time`` the process CPU
    time (all threads) per step, which a busy machine distorts less than wall time;
    ``tokens_per_second`` counts the real (non-padding) tokens trained on.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.tokens = self.trained_tokens = 0
        self.paused = self.cpu_paused = 0.0
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def restart(self) -> None:
        """Restart the clock (after work that is not training: evaluation, checkpoints)."""
        if self.steps:  # mid-window: keep the time already spent on its steps
            self.paused += time.perf_counter() - self.start
            self.cpu_paused += time.process_time() - self.cpu_start
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        self.steps.append(metrics)
        self.tokens += tokens

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start + self.paused, 1e-9)
        cpu = time.process_time() - self.cpu_start + self.cpu_paused
        keys = dict.fromkeys(k for m in self.steps for k in m)
        means = {k: float(np.mean([m[k] for m in self.steps if k in m])) for k in keys}
        self.trained_tokens += self.tokens
        record = {**means, "tokens_per_second": self.tokens / elapsed,
                  "tokens": self.trained_tokens, "step_time": elapsed / len(self.steps),
                  "cpu_time": cpu / len(self.steps)}
        self.steps, self.tokens, self.paused, self.cpu_paused = [], 0, 0.0, 0.0
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return record


def combine(metrics: list[dict[str, float]], fractions: list[float]) -> dict[str, float]:
    """One step's metrics: ``loss`` summed (micro losses are already scaled), others averaged."""
    out = {"loss": sum(m["loss"] for m in metrics)}
    for key in metrics[0]:
        if key != "loss":
            out[key] = sum(f * m[key] for f, m in zip(fractions, metrics))
    return out


def memory_stats(backend: Any) -> dict[str, float]:
    """Peak memory by kind (``memory/peak_rss_gb``, ``memory/mlx_peak_gb``,
    ``memory/cuda_peak_gb``...) from a backend's optional ``memory_stats()`` (bytes)."""
    stats = getattr(backend, "memory_stats", None)
    if stats is None:
        return {}
    return {f"memory/{kind}_gb": value / 1e9 for kind, value in stats().items()}


def resume(cfg: Any, backend: Any, run_dir: Path, algorithm_state: Any = None
           ) -> tuple[int, Cursor]:
    """Load the newest usable checkpoint into ``backend`` (falling back past a corrupt one, the
    logs cut back to its step: :func:`checkpoint.resume_from_checkpoint`) and into
    ``algorithm_state``; its step and data cursor."""
    state = ckpt.resume_from_checkpoint(cfg, backend, run_dir)
    if algorithm_state is not None:
        if "algorithm_state" not in state:
            raise ValueError(f"--resume: the checkpoint at step {state['step']} under {run_dir} "
                             "holds no algorithm state (the running values this algorithm keeps "
                             "across steps); use a new --run-dir")
        algorithm_state.load_state_dict(state["algorithm_state"])
    return state["step"], Cursor(**state["cursor"])
