"""``--compare mlx-lm``: the recipe through mlx-lm's own LoRA trainer, matched setting by setting.

A YAML config for ``mlx_lm lora --train`` is generated from the recipe: same model dir, data
dir, LoRA rank, scale = alpha / rank, the same target layers in every block, batch size,
``max_seq_length``, iterations, learning rate, AdamW with bias correction and no weight decay
(as ours), no gradient clipping (mlx-lm has none; the recipe turns ours off too),
``mask_prompt: false`` (the recipe trains ours on every token: ``--train-on all``). What mlx-lm
does differently is its own business and part of what is measured: it batches examples of
similar length together, pads to a multiple of 32 and computes the full logits.

The settings used are read back from the ``adapter_config.json`` mlx-lm writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from . import proc
from .measure import Run, record_outcome
from .recipe import Recipe, block_linear_names, data_fingerprint, stored_dtype
from .run_ours import normalise_targets

SUPPORTED = ("sft",)


def yaml_config(recipe: Recipe, model: Path, data: Path, adapters: Path) -> dict:
    keys = normalise_targets(recipe.target_modules, model) if recipe.target_modules \
        else block_linear_names(model)
    return {
        "model": str(model), "train": True, "data": str(data),
        "fine_tune_type": recipe.fine_tune_type, "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0, "bias_correction": True}},
        "seed": recipe.seed, "num_layers": -1, "batch_size": recipe.batch_size,
        "iters": recipe.steps, "val_batches": 1, "learning_rate": recipe.learning_rate,
        "steps_per_report": 1, "steps_per_eval": 10**9, "save_every": 10**9,
        "max_seq_length": recipe.max_length, "adapter_path": str(adapters),
        "mask_prompt": False, "grad_checkpoint": False,
        "lora_parameters": {"rank": recipe.lora_rank, "scale": recipe.lora_alpha / recipe.lora_rank,
                            "dropout": 0.0, "keys": keys},
    }


def run_mlx_lm(device: str, recipe: Recipe, model: Path, data: Path, out: Path,
               force_cpu: bool = False, timeout: float | None = None) -> Run:
    name = f"mlx-lm-{device}"
    run_dir = out / "runs" / name
    run = Run(name, "mlx-lm", "mlx", device, run_dir=str(run_dir))
    if recipe.algorithm not in SUPPORTED or recipe.fine_tune_type not in ("lora", "dora", "full"):
        run.status, run.message = "skipped", (f"mlx-lm's trainer has no {recipe.algorithm!r}; "
                                              "--compare mlx-lm supports sft")
        return run
    if not data.is_dir() or not (data / "valid.jsonl").is_file():
        run.status, run.message = "skipped", f"mlx-lm needs a data dir with valid.jsonl: {data}"
        return run
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "mlx_lm.yaml"
    config.write_text(yaml.safe_dump(yaml_config(recipe, model, data, run_dir / "adapters")))
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "scripts.benchkit.mlx_lm_entry", str(metrics),
           *(["--mlx-cpu"] if force_cpu else []), "--", "--config", str(config)]
    run.command = cmd
    result = proc.run(cmd, run_dir, name, metrics, recipe.steps, timeout=timeout)
    if not record_outcome(run, result, metrics):
        return run
    run.settings = read_settings(run_dir / "adapters" / "adapter_config.json")
    return run


def read_settings(path: Path) -> dict:
    """The matched settings as mlx-lm recorded them (it trains in the weights' stored dtype)."""
    cfg = json.loads(path.read_text())
    model = Path(cfg["model"]).resolve()
    lora = cfg.get("lora_parameters") or {}
    rank = lora.get("rank")
    return {
        "algorithm": "sft",  # mlx-lm's LoRA trainer trains SFT only
        "model": str(model),
        "data": data_fingerprint(Path(cfg["data"])),
        "fine_tune_type": cfg["fine_tune_type"],
        "lora_rank": rank,
        "lora_alpha": float(lora["scale"] * rank) if rank else None,
        "target_modules": normalise_targets(lora.get("keys") or [], model),
        "batch_size": cfg["batch_size"] * cfg.get("grad_accumulation_steps", 1),
        "max_length": cfg["max_seq_length"],
        "steps": cfg["iters"],
        "learning_rate": float(cfg["learning_rate"]),
        "dtype": stored_dtype(model),
    }
