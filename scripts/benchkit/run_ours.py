"""Run the recipe through our own CLIs: ``python -m mlx_ft|cuda_ft <algorithm> <flags>``.

The algorithm name is passed through untouched (sft, dpo, grpo, ...), so any algorithm the CLI
offers can be benchmarked. Per-step numbers come from the run dir's ``metrics.jsonl`` (the
harness forces ``--log-every 1``); the settings actually used come from its ``config.json``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import proc
from .backends import Target
from .measure import Run, record_outcome
from .recipe import (
    ONLINE_MATCHED,
    Recipe,
    block_linear_names,
    data_fingerprint,
    family,
    our_flags,
    resolved_dtype,
)


def command(t: Target, recipe: Recipe, flags: list[str], force_cpu: bool) -> list[str]:
    if t.framework == "mlx" and force_cpu:
        # MLX has no environment switch for its device: a tiny launcher sets it first.
        return [sys.executable, "-m", "scripts.benchkit.launch", "--mlx-cpu", recipe.algorithm,
                *flags]
    return [sys.executable, "-m", t.package, recipe.algorithm, *flags]


def run_ours(t: Target, recipe: Recipe, model: Path, data: Path, out: Path, variant: str = "",
             variant_flags: list[str] | None = None, variant_env: dict | None = None,
             force_cpu: bool = False, timeout: float | None = None) -> Run:
    name = f"{t.name}[{variant}]" if variant else t.name
    run_dir = out / "runs" / name.replace("[", "_").replace("]", "")
    dtype = resolved_dtype(recipe, t.device)
    flags = our_flags(recipe, model, data, run_dir / "train", dtype) + list(variant_flags or [])
    env = dict(variant_env or {})
    if t.framework == "torch" and t.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # torch on the CPU even where a GPU exists
    cmd = command(t, recipe, flags, force_cpu)
    run = Run(name, "ours", t.framework, t.device, variant, command=cmd, env=env,
              run_dir=str(run_dir))
    metrics = run_dir / "train" / "metrics.jsonl"
    result = proc.run(cmd, run_dir, name, metrics, recipe.steps, env, timeout)
    if not record_outcome(run, result, metrics):
        return run
    run.settings = read_settings(run_dir / "train" / "config.json", result.log)
    return run


def read_settings(config_path: Path, log: Path) -> dict:
    """The matched settings as this run resolved them (config.json, device line of the log)."""
    cfg = json.loads(config_path.read_text())
    data = cfg["data"][0] if isinstance(cfg["data"], list) else cfg["data"]  # one source here
    model = Path(cfg["model_path"]).resolve()
    targets = cfg.get("target_modules") or block_linear_names(model)
    match = re.search(r"(?:mlx_ft|cuda_ft): device=\S+ dtype=(\w+)", log.read_text())
    out = {
        "model": str(model),
        "data": data_fingerprint(Path(data)),
        "fine_tune_type": cfg["fine_tune_type"],
        "lora_rank": cfg["lora_rank"],
        "lora_alpha": float(cfg["lora_alpha"]),
        "target_modules": normalise_targets(targets, model),
        "batch_size": cfg["batch_size"] * cfg.get("grad_accumulation_steps", 1),
        "max_length": cfg["max_length"],
        "steps": cfg["steps"],
        "learning_rate": float(cfg["learning_rate"]),
        "dtype": match.group(1) if match else cfg.get("dtype"),
    }
    algorithm = cfg.get("algorithm")
    if algorithm:
        out["algorithm"] = algorithm
    kind = family(algorithm or "sft")
    if kind == "preference":
        types = cfg.get("loss_type") or ["sigmoid"]
        out.update(beta=float(cfg["beta"]),
                   loss_type=",".join([types] if isinstance(types, str) else types))
    if kind == "online":
        out.update({k: cfg[k] for k in ONLINE_MATCHED if k in cfg})
        out["reward"] = ",".join(cfg.get("reward") or [])
        for key in ("temperature", "top_p", "beta", "epsilon"):
            out[key] = float(out[key])
    return out


def normalise_targets(targets: list[str], model: Path) -> list[str]:
    """Leaf names or block paths -> sorted block paths that exist in the model."""
    every = block_linear_names(model)
    return sorted({k for k in every for t in targets if k == t or k.rsplit(".", 1)[-1] == t})
