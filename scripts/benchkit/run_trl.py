"""``--compare trl``: the recipe through TRL's ``SFTTrainer`` + PEFT LoRA (where TRL is installed);
``--compare trl-liger``: the same with ``use_liger_kernel=True`` (Liger-Kernel's Triton kernels,
where ``liger-kernel`` is installed).

TRL is not a dependency of this project: when ``import trl`` fails in a probe subprocess the
run is reported as skipped with the ``pip install`` line. The trainer script is
:mod:`scripts.benchkit.trl_entry`, fed a JSON spec generated from the recipe.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import proc
from .measure import Run, record_outcome
from .recipe import (
    ONLINE,
    ONLINE_MATCHED,
    Recipe,
    block_linear_names,
    data_fingerprint,
    family,
    resolved_dtype,
)
from .run_ours import normalise_targets

SUPPORTED = ("sft", "dpo", *ONLINE)


def trl_version(liger: bool = False) -> str | None:
    code = "import trl, peft; print(trl.__version__)"
    if liger:
        code = "import liger_kernel, trl, peft; print(trl.__version__)"
    probe = subprocess.run([sys.executable, "-c", code],
                           check=False, capture_output=True, text=True,
                           env=proc.child_env())
    return probe.stdout.strip() if probe.returncode == 0 else None


def run_trl(device: str, recipe: Recipe, model: Path, data: Path, out: Path,
            timeout: float | None = None, liger: bool = False) -> Run:
    runner = "trl-liger" if liger else "trl"
    name = f"{runner}-{device}"
    run_dir = out / "runs" / name
    run = Run(name, runner, "torch", device, run_dir=str(run_dir))
    version = trl_version(liger)
    if version is None:
        what = "TRL and Liger-Kernel are" if liger else "TRL is"
        package = "trl liger-kernel" if liger else "trl"
        run.status, run.message = "skipped", (f"{what} not importable here; to compare: "
                                              f"pip install {package}  (not posttrain "
                                              "dependencies)")
        return run
    if recipe.algorithm not in SUPPORTED or recipe.fine_tune_type != "lora":
        run.status, run.message = "skipped", (f"--compare trl supports LoRA {', '.join(SUPPORTED)}"
                                              f"; the recipe is {recipe.fine_tune_type} "
                                              f"{recipe.algorithm}")
        return run
    run_dir.mkdir(parents=True, exist_ok=True)
    targets = normalise_targets(recipe.target_modules, model) if recipe.target_modules \
        else block_linear_names(model)
    spec = {"model": str(model), "data": str(data), "out": str(run_dir),
            "batch_size": recipe.batch_size, "max_length": recipe.max_length,
            "steps": recipe.steps, "learning_rate": recipe.learning_rate, "seed": recipe.seed,
            "lora_rank": recipe.lora_rank, "lora_alpha": recipe.lora_alpha,
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
            "dtype": resolved_dtype(recipe, device), "device": device, "liger": liger,
            "algorithm": recipe.algorithm, "beta": recipe.beta,
            "prompts_per_step": recipe.prompts_per_step,
            "num_generations": recipe.num_generations,
            "max_completion_length": recipe.max_completion_length,
            "temperature": recipe.temperature, "reward": recipe.reward}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "scripts.benchkit.trl_entry", str(run_dir / "spec.json")]
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    run.command, run.env = cmd, env
    result = proc.run(cmd, run_dir, f"{name} (TRL {version}{' + Liger' if liger else ''})",
                      metrics, recipe.steps, env,
                      timeout)
    if not record_outcome(run, result, metrics):
        return run
    run.settings = read_settings(run_dir / "settings.json")
    return run


def read_settings(path: Path) -> dict:
    """The matched settings as TRL resolved them (``settings.json`` of the entry)."""
    cfg = json.loads(path.read_text())
    model = Path(cfg["model"]).resolve()
    algorithm = cfg.get("algorithm", "sft")
    out = {**{k: cfg[k] for k in ("fine_tune_type", "lora_rank", "batch_size", "max_length",
                                  "steps", "dtype")},
           "model": str(model), "data": data_fingerprint(Path(cfg["data"])),
           "lora_alpha": float(cfg["lora_alpha"]),
           "target_modules": normalise_targets(cfg["target_modules"], model),
           "learning_rate": float(cfg["learning_rate"]), "algorithm": algorithm}
    if family(algorithm) == "preference":
        out.update(beta=cfg["beta"], loss_type=cfg["loss_type"])
    if family(algorithm) == "online":
        out.update({k: cfg[k] for k in ONLINE_MATCHED})
    return out
