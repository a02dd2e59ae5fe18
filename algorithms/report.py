"""What a finished run leaves for people: PNG plots of its metrics and a README (model card).

Both are made from ``metrics.jsonl`` and ``config.json`` alone, at the end of every run
(``--no-plots`` skips the plots):

- ``plots/training.png``: loss (train and validation), learning rate, gradient norm,
  tokens/s and peak memory against the optimiser step;
- ``plots/online.png`` (online methods): reward (train and validation), each reward function,
  KL, completion lengths, and the clip fraction when logged;
- ``README.md``: base model, algorithm, data, key settings, final metrics, and how to load the
  result in mlx-lm, transformers + PEFT and vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TRAINING = (("loss", "loss"), ("learning_rate", "learning rate"), ("grad_norm", "grad norm"),
            ("tokens_per_second", "tokens / s"), ("peak_memory_gb", "peak memory (GB)"))
ONLINE = (("reward", "reward"), ("rewards/", "reward per function"), ("kl", "KL"),
          ("completions/mean_length", "completion length"), ("clip_ratio/region_mean",
                                                                "clip fraction"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], split: str, key: str) -> dict[str, tuple[list, list]]:
    """``{name: (steps, values)}`` of ``key`` (a prefix when it ends with ``/``)."""
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("split") != split:
            continue
        for name, value in r.items():
            match = name.startswith(key) and name.endswith("/mean") if key.endswith("/") \
                else name == key
            if match and isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = out.setdefault(name, ([], []))
                steps.append(r["step"])
                values.append(value)
    return out


def _figure(records: list[dict], panels: tuple, title: str, path: Path) -> bool:
    """One PNG with a panel per metric that was logged; False when none was."""
    shown = [(key, label) for key, label in panels
             if any(_series(records, s, key) for s in ("train", "valid"))]
    if not shown:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=90)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, style in (("train", "-"), ("valid", "o--")):
            for name, (steps, values) in _series(records, split, key).items():
                tag = name if key.endswith("/") else split
                ax.plot(steps, values, style, markersize=3, label=tag)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def write_plots(run_dir: Path) -> list[Path]:
    """The PNGs of the module docstring that have data; their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = []
    for panels, name, title in ((TRAINING, "training.png", "training"),
                                (ONLINE, "online.png", "online RL")):
        path = run_dir / "plots" / name
        if _figure(records, panels, f"{run_dir.name}: {title}", path):
            out.append(path)
    return out


def _final(records: list[dict], split: str) -> dict[str, float]:
    last = [r for r in records if r.get("split") == split]
    if not last:
        return {}
    skip = {"time", "split", "step", "epoch", "tokens", "step_time", "cpu_time"}
    return {k: v for k, v in last[-1].items() if k not in skip and isinstance(v, (int, float))
            and not k.startswith(("memory/", "time/"))}


def model_card(run_dir: Path, config: dict[str, Any], records: list[dict]) -> str:
    """The run dir's README.md (module docstring)."""
    algorithm, backend = config.get("algorithm", "?"), config.get("backend", "?")
    adapters = Path(run_dir) / "adapters"
    full = config.get("fine_tune_type") == "full"
    mlx = backend == "mlx_ft"
    model = config.get("model_path") or config.get("model")
    keys = ("fine_tune_type", "lora_rank", "lora_alpha", "target_modules", "init_adapter",
            "quantize_base", "learning_rate", "lr_schedule", "batch_size",
            "grad_accumulation_steps", "steps", "epochs", "max_length", "seed", "beta",
            "loss_type", "reward", "num_generations")
    settings = "\n".join(f"| `{k}` | `{config[k]}` |" for k in keys
                         if k in config and config[k] not in ("", [], None))
    lines = [f"# {Path(run_dir).name}", "",
             f"`{algorithm}` on `{model}` with `python -m {backend}`, data `{config.get('data')}`.",
             "", "| setting | value |", "|---|---|", settings, "", "## Final metrics", ""]
    for split in ("train", "valid", "test"):
        final = _final(records, split)
        if final:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:8])
            lines.append(f"- {split}: {shown}")
    lines += ["", "## Use it", ""]
    if full:
        lines += [f"`{adapters}` is a complete model dir.", "", "```",
                  f"python -m mlx_lm generate --model {adapters} --prompt 'Hello'" if mlx else
                  f"AutoModelForCausalLM.from_pretrained('{adapters}')",
                  f"python -m converters mlx-to-hf {adapters} hf_out   # then vLLM: vllm serve "
                  "hf_out" if mlx else f"vllm serve {adapters}", "```"]
    else:
        peft = f"{run_dir}/peft_adapter" if mlx else str(adapters)
        lines += ["```",
                  f"python -m {backend} chat --model {config.get('model')} --adapter {adapters}",
                  (f"python -m mlx_lm generate --model {model} --adapter-path "
                  f"{adapters if mlx else run_dir / 'mlx_adapter'} --prompt 'Hello'"), "```", "",
                  "transformers + PEFT:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  (f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                  f"'{model}'), '{peft}')"), "```", "",
                  f"vLLM: `vllm serve {model} --enable-lora --lora-modules tuned={peft}`", ""]
        if mlx:
            lines += [("The PEFT dir comes from `python -m converters mlx-adapter-to-peft "
                      f"{adapters} {peft}`; `python -m converters fuse {model} {adapters} OUT` "
                      "merges it into the model.")]
        else:
            lines += [("The mlx-lm dir comes from `python -m converters peft-to-mlx-adapter "
                      f"{adapters} {run_dir / 'mlx_adapter'}`; `python -m converters fuse {model} "
                      f"{adapters} OUT` merges it into the model.")]
    return "\n".join(lines) + "\n"


def finish_run(run_dir: Path, plots: bool = True) -> None:
    """Write the plots (unless ``plots`` is off) and the README of a finished run."""
    from converters.atomic import write_text_atomically

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if plots:
        write_plots(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    write_text_atomically(run_dir / "README.md", model_card(run_dir, config, records))
