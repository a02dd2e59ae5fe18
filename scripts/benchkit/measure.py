"""What one run produced, and the statistics drawn from its steps.

Every runner turns its tool's output into the same per-step records::

    {"step": 3, "loss": 2.31, "step_time": 4.2, "tokens": 812, "cpu_time": 8.1,
     "time/generation": ..., "time/logps": ..., "time/update": ...}  # the time split

``tokens`` counts real (non-padding) tokens of the step. The first ``warmup`` steps
(compilation, allocator growth) are left out of every statistic; the loss curve keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

# seconds per step by phase: online steps (generation, scoring, the no-grad log-prob passes,
# the update), offline steps (reference pass, forward, backward, optimiser; a lazily evaluated
# backend logs forward and backward as one ``forward_backward``)
ONLINE_SPLIT = ("time/generation", "time/scoring", "time/logps", "time/update")
OFFLINE_SPLIT = ("time/reference", "time/forward", "time/backward", "time/forward_backward",
                 "time/optimizer")
TIME_SPLIT = ONLINE_SPLIT + OFFLINE_SPLIT


@dataclasses.dataclass
class Run:
    name: str                 # "mlx-cpu", "mlx-cpu[packing]", "mlx-lm-cpu", "trl-cpu"
    runner: str               # "ours" | "mlx-lm" | "trl"
    framework: str            # "mlx" | "torch"
    device: str               # "cpu" | "gpu"
    variant: str = ""
    status: str = "ok"        # "ok" | "failed" | "skipped"
    message: str = ""
    command: list = dataclasses.field(default_factory=list)
    env: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    steps: list = dataclasses.field(default_factory=list)
    memory: dict = dataclasses.field(default_factory=dict)  # GB by kind
    wall_s: float = 0.0
    cpu_s: float = 0.0
    summary: dict = dataclasses.field(default_factory=dict)
    run_dir: str = ""
    load_avg: list = dataclasses.field(default_factory=list)  # 1-min load at start and end

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def steps_from_metrics(records: list[dict]) -> list[dict]:
    """Per-step records from a ``metrics.jsonl`` of ``python -m mlx_ft|cuda_ft`` (log_every=1).

    ``step_time`` is the loop's own per-step time when logged, else the gap between records;
    ``tokens`` is ``step_tokens``, else the increase of the cumulative real-token count
    ``tokens``, else tokens/s x step time.
    """
    train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
    out, prev_tokens, prev_time = [], 0, None
    for r in train:
        step_time = r.get("step_time")
        if step_time is None and prev_time is not None:
            step_time = r["time"] - prev_time
        prev_time = r.get("time")
        if "step_tokens" in r:  # written per step by the mlx-lm and TRL entries
            tokens = r["step_tokens"]
        elif "tokens" in r:  # cumulative in our metrics.jsonl
            tokens, prev_tokens = r["tokens"] - prev_tokens, r["tokens"]
        else:
            tokens = r.get("tokens_per_second", 0.0) * (step_time or 0.0)
        step = {"step": r["step"], "loss": r["loss"], "step_time": step_time, "tokens": tokens}
        if "cpu_time" in r:
            step["cpu_time"] = r["cpu_time"]
        step.update({k: r[k] for k in TIME_SPLIT if k in r})
        if "completions/mean_length" in r:  # online: generated tokens per completion
            step["completion_length"] = r["completions/mean_length"]
        out.append(step)
    return out


def memory_from_metrics(records: list[dict]) -> dict[str, float]:
    """Peak memory (GB) by kind over the run: ``mlx_peak``, ``cuda_peak``, ``peak_rss``."""
    out: dict[str, float] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("memory/") and key.endswith("_gb"):
                kind = key[len("memory/"):-len("_gb")]
                out[kind] = max(out.get(kind, 0.0), float(value))
    return out


def _spread(values: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": qs[0], "p75": qs[2],
            "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) >= 2 else 0.0}


def summarize(steps: list[dict], warmup: int) -> dict[str, Any]:
    """Throughput and step-time statistics over the steps after ``warmup``."""
    measured = [s for s in steps[warmup:] if s.get("step_time")]
    if not measured:
        return {"measured_steps": 0}
    times = [s["step_time"] for s in measured]
    tokens = sum(s["tokens"] for s in measured)
    out: dict[str, Any] = {
        "measured_steps": len(measured),
        "tokens": tokens,
        "tokens_per_s": tokens / sum(times),
        "tokens_per_s_median": statistics.median(s["tokens"] / s["step_time"] for s in measured),
        "step_time": _spread(times),
        "final_loss": steps[-1]["loss"],
    }
    cpu = [s["cpu_time"] for s in measured if s.get("cpu_time")]
    if len(cpu) == len(measured):
        out["tokens_per_cpu_s"] = tokens / sum(cpu)
    # mean seconds per step; a step without a key did none of that work (RL generates once
    # per num_iterations steps)
    split = {k: statistics.fmean(s.get(k, 0.0) for s in measured) for k in TIME_SPLIT
             if any(k in s for s in measured)}
    if split:
        out["time_split"] = split
    lengths = [s["completion_length"] for s in measured if "completion_length" in s]
    if lengths:  # sampling differs between tools: say how long the completions were
        out["completion_length"] = statistics.fmean(lengths)
    return out


def record_outcome(run: Run, result: Any, metrics: Path) -> bool:
    """Fill ``run`` with what its finished subprocess measured (times, steps, memory); False,
    with ``run.status = "failed"`` and the reason, when it failed or logged no step."""
    run.wall_s, run.cpu_s = result.wall_s, result.cpu_s
    records = read_jsonl(metrics)
    run.steps = steps_from_metrics(records)
    run.memory = {**memory_from_metrics(records), "peak_rss": result.peak_rss_bytes / 1e9}
    if result.returncode != 0 or not run.steps:
        run.status = "failed"
        run.message = result.failure()
        return False
    return True
