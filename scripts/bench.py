"""Cross-hardware benchmark: one recipe on every backend present, one table, one chart.

    python scripts/bench.py --model smollm2-135m --steps 30 --compare mlx-lm trl
    python -m scripts.bench --model random:1b --backends mlx-cpu --steps 5 --warmup 1
    python scripts/bench.py --variant padded= --variant packed=--packing --compare mlx-lm

Each run (our backends via ``python -m mlx_ft|cuda_ft <algorithm>``, and with ``--compare``
mlx-lm's own LoRA trainer and TRL + PEFT) runs in its own subprocess, one after another. Per run:
tokens/s over real tokens, step time median and spread after ``--warmup`` steps, peak memory
(process RSS; MLX's peak; torch's CUDA peak), the RL time split when the metrics carry it, and the
loss curve. Writes ``results.json``, ``results.md`` and PNG charts into ``--out``, and gives a
parity verdict over our backends' loss curves. Compared runs must have matched settings (read
back from each tool's own record); a mismatch is refused, naming the setting.

``--variant LABEL=ARGS`` runs our backends once per variant: ``ARGS`` holds CLI flags and/or
``NAME=VALUE`` environment settings (e.g. ``eager=MLX_DISABLE_COMPILE=1``), so speed levers can
be measured one by one in one invocation, side by side with the baselines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``scripts.benchkit`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchkit import backends as bk
from scripts.benchkit.measure import Run, summarize
from scripts.benchkit.parity import DEFAULT_ATOL, parity
from scripts.benchkit.recipe import Recipe, resolve_data, resolve_model, resolved_dtype
from scripts.benchkit.settings import compare

REPO = Path(__file__).resolve().parents[1]
COMPARE = ("mlx-lm", "trl", "trl-liger")
# --kernel-variants: the torch backend with and without its Triton kernels (MLX has none)
KERNEL_VARIANTS = ("kernels=--kernels triton", "no-kernels=--kernels torch")


def build_parser() -> argparse.ArgumentParser:
    d = Recipe()
    p = argparse.ArgumentParser(prog="python scripts/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = p.add_argument_group("recipe")
    r.add_argument("--model", default=d.model,
                   help="model dir, known short name, or random:SIZE (tiny, 135m, 360m, 1b, 3b)")
    r.add_argument("--algorithm", default=d.algorithm,
                   help="passed to python -m mlx_ft|cuda_ft (sft, dpo, grpo, ...)")
    r.add_argument("--data", default="",
                   help="data file or dir, or synthetic:chat / synthetic:preference / "
                        "synthetic:arith; default: chat (sft), preference (dpo), arith (grpo)")
    r.add_argument("--fine-tune-type", default=d.fine_tune_type, choices=["lora", "dora", "full"])
    r.add_argument("--lora-rank", type=int, default=d.lora_rank)
    r.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    r.add_argument("--target-modules", nargs="*", default=[],
                   help="layers to adapt; none = every linear layer of every block")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--max-length", type=int, default=d.max_length)
    r.add_argument("--steps", type=int, default=d.steps)
    r.add_argument("--warmup", type=int, default=d.warmup,
                   help="leading steps left out of the timings")
    r.add_argument("--learning-rate", type=float, default=d.learning_rate)
    r.add_argument("--dtype", default=d.dtype,
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = float32 on CPU, bfloat16 on a GPU")
    r.add_argument("--model-dtype", default=d.model_dtype, choices=["float32", "bfloat16"],
                   help="dtype random:SIZE weights are written in")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--train-on", default=d.train_on, choices=["auto", "completion", "all"],
                   help="sft only; 'all' matches mlx-lm's mask_prompt=false")
    r.add_argument("--extra", default="", help="more flags for our CLIs, one string")
    o = p.add_argument_group("preference and online recipes (dpo, grpo)")
    o.add_argument("--beta", type=float, default=None,
                   help="DPO's beta / GRPO's KL coefficient; default 0.1 (dpo), 0.04 (grpo)")
    o.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    o.add_argument("--num-generations", type=int, default=d.num_generations,
                   help="completions per prompt (G)")
    o.add_argument("--max-completion-length", type=int, default=d.max_completion_length,
                   help="new tokens per completion at most")
    o.add_argument("--temperature", type=float, default=d.temperature)
    o.add_argument("--reward", default=d.reward,
                   help="a built-in reward of rewards/ that takes (prompts, completions, ...) as "
                        "TRL's reward functions do")
    h = p.add_argument_group("harness")
    h.add_argument("--backends", nargs="*", default=None,
                   help=f"subset of {', '.join(bk.TARGETS)}; default: every one available")
    h.add_argument("--compare", nargs="*", default=[], choices=COMPARE,
                   help="also run the recipe through these trainers, matched")
    h.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                   help="run our backends once per variant with extra flags / NAME=VALUE env "
                        "(a variant setting --kernels runs on the torch backends only)")
    h.add_argument("--kernel-variants", action="store_true",
                   help="add the variants " + " and ".join(KERNEL_VARIANTS)
                        + " (torch backends; Triton needs a CUDA GPU)")
    h.add_argument("--repeats", type=int, default=1,
                   help="run everything this many times, interleaved (noisy machines)")
    h.add_argument("--out", default=None, help="output dir (default runs/bench/<time>)")
    h.add_argument("--timeout", type=float, default=None, help="seconds per run")
    h.add_argument("--parity-atol", type=float, default=None,
                   help="loss-curve tolerance; default 2e-3 in float32, 5e-2 in 16-bit")
    h.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    h.add_argument("--list-backends", action="store_true", help="print what is available, exit")
    return p


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``LABEL=ARGS`` -> (label, CLI flags, env). In ARGS, ``NAME=VALUE`` with an upper-case
    NAME is an environment setting; everything else is a flag for our CLIs."""
    label, sep, args = text.partition("=")
    if not sep or not label or not label.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {text!r}: expected LABEL=ARGS, e.g. packed=--packing")
    flags, env = [], {}
    for token in shlex.split(args):
        name, eq, value = token.partition("=")
        if eq and not name.startswith("-") and name.replace("_", "").isupper():
            env[name] = value
        else:
            flags.append(token)
    return label, flags, env


def trl_for_mlx(recipe: Recipe) -> bool:
    """mlx-lm trains SFT only: for other algorithms TRL is the MLX backend's baseline too."""
    return recipe.algorithm != "sft"


def recipe_from(args: argparse.Namespace) -> Recipe:
    recipe = Recipe(model=args.model, algorithm=args.algorithm, data=args.data,
                    fine_tune_type=args.fine_tune_type, lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, target_modules=list(args.target_modules),
                    batch_size=args.batch_size, max_length=args.max_length, steps=args.steps,
                    warmup=args.warmup, learning_rate=args.learning_rate, dtype=args.dtype,
                    seed=args.seed, train_on=args.train_on, model_dtype=args.model_dtype,
                    extra=shlex.split(args.extra), beta=args.beta,
                    prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                    max_completion_length=args.max_completion_length,
                    temperature=args.temperature, reward=args.reward)
    recipe.validate()
    return recipe


def plan_runs(targets: list[bk.Target], variants: list, compare_with: list[str],
              trl_for_mlx: bool = False) -> list[tuple]:
    """The runs of one repeat, in order: ("ours", target, variant) and ("mlx-lm"|"trl"|
    "trl-liger", device). A variant that sets ``--kernels`` is skipped on MLX targets (MLX
    ignores the flag: it would be the same run twice). ``trl_for_mlx``: TRL is the baseline of
    the MLX targets too (algorithms mlx-lm has no trainer for: dpo, grpo)."""
    plan: list[tuple] = [("ours", t, v) for t in targets for v in variants
                         if t.framework == "torch" or "--kernels" not in v[1]]
    for tool in compare_with:
        framework = "mlx" if tool == "mlx-lm" else "torch"
        frameworks = {framework} | ({"mlx"} if trl_for_mlx and tool != "mlx-lm" else set())
        for device in dict.fromkeys(t.device for t in targets if t.framework in frameworks):
            plan.append((tool, device))
        if not any(t.framework in frameworks for t in targets):
            plan.append((tool, "none"))  # reported as skipped: nothing of ours to compare with
    return plan


def execute(item: tuple, recipe: Recipe, model: Path, data: Path, out: Path,
            available: dict, timeout: float | None) -> Run:
    from scripts.benchkit.run_mlx_lm import run_mlx_lm
    from scripts.benchkit.run_ours import run_ours
    from scripts.benchkit.run_trl import run_trl

    mlx_gpu = "mlx-metal" in available or "mlx-cuda" in available
    if item[0] == "ours":
        _, t, (label, flags, env) = item
        return run_ours(t, recipe, model, data, out, label, flags, env,
                        force_cpu=t.device == "cpu" and mlx_gpu, timeout=timeout)
    tool, device = item
    if device == "none":
        run = Run(f"{tool}", tool, "mlx" if tool == "mlx-lm" else "torch", "cpu")
        run.status, run.message = "skipped", f"--compare {tool}: no {run.framework} backend selected"
        return run
    if tool == "mlx-lm":
        return run_mlx_lm(device, recipe, model, data, out, force_cpu=device == "cpu" and mlx_gpu,
                          timeout=timeout)
    return run_trl(device, recipe, model, data, out, timeout=timeout, liger=tool == "trl-liger")


def pair_comparisons(runs: list[Run], trl_for_mlx: bool = False) -> list[dict]:
    """Each of our runs against the baselines of its framework and device, same repeat (and
    MLX runs against TRL too with ``trl_for_mlx``)."""
    out = []
    for ours in (r for r in runs if r.runner == "ours"):
        repeat = ours.name.partition("#")[2]
        tools = ("mlx-lm",) if ours.framework == "mlx" else ("trl", "trl-liger")
        if ours.framework == "mlx" and trl_for_mlx:
            tools += ("trl", "trl-liger")
        for base in runs:
            if base.runner in tools and base.device == ours.device \
                    and base.name.partition("#")[2] == repeat:
                out.append(compare(ours, base))
    return out


def aggregate(comparisons: list[dict]) -> list[dict]:
    """Median ratios over repeats, per (ours, baseline) pair without the repeat suffix."""
    groups: dict[tuple, list[dict]] = {}
    for c in comparisons:
        if c["status"] == "ok":
            key = (c["ours"].partition("#")[0], c["baseline"].partition("#")[0])
            groups.setdefault(key, []).append(c)
    out = []
    for (ours, base), cs in groups.items():
        if len(cs) < 2:
            continue
        row = {"ours": f"{ours} (median of {len(cs)})", "baseline": base, "status": "ok"}
        for key in ("tokens_per_s_ratio", "tokens_per_cpu_s_ratio", "peak_rss_ratio",
                    "mlx_peak_ratio", "cuda_peak_ratio"):
            values = [c[key] for c in cs if c.get(key)]
            row[key] = statistics.median(values) if values else None
        out.append(row)
    return out


def parity_groups(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    groups: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        if r.runner == "ours" and r.status == "ok" and "#" not in r.name:
            groups.setdefault(r.variant, {})[r.name] = [s["loss"] for s in r.steps]
    return groups


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    available = bk.detect(str(REPO))
    if args.list_backends:
        for name in bk.TARGETS:
            print(f"{name:<11} {'available' if name in available else '-'}")
        return 0
    try:
        recipe = recipe_from(args)
        targets = bk.select(args.backends, available)
        texts = list(args.variant) + (list(KERNEL_VARIANTS) if args.kernel_variants else [])
        variants = [parse_variant(v) for v in texts] or [("", [], {})]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO / "runs" / "bench" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(recipe, out.parent / "models")
    data = resolve_data(recipe, out)
    plan = plan_runs(targets, variants, args.compare, trl_for_mlx(recipe))
    print(f"bench: {len(plan) * args.repeats} runs of {recipe.algorithm} on {model.name} "
          f"({', '.join(t.name for t in targets)}) -> {out}", file=sys.stderr, flush=True)
    runs: list[Run] = []
    for repeat in range(args.repeats):
        for item in plan:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            run = execute(item, recipe, model, data, out / (f"repeat{repeat + 1}" if repeat
                                                            else ""), available, args.timeout)
            if load is not None:
                run.load_avg = [round(load, 2), round(os.getloadavg()[0], 2)]
            if repeat:
                run.name += f"#{repeat + 1}"
            run.summary = summarize(run.steps, recipe.warmup) if run.status == "ok" else {}
            runs.append(run)
            print(f"bench: {run.name}: {run.status}"
                  + (f", {run.summary.get('tokens_per_s', 0):.1f} tokens/s, "
                     f"peak RSS {run.memory.get('peak_rss', 0):.2f} GB" if run.status == "ok"
                     else f" ({run.message.splitlines()[0] if run.message else ''})"),
                  file=sys.stderr, flush=True)
    return finish(args, recipe, available, targets, runs, out)


def finish(args, recipe: Recipe, available: dict, targets: list, runs: list[Run],
           out: Path) -> int:
    from scripts.benchkit import charts, machine, report

    comparisons = pair_comparisons(runs, trl_for_mlx(recipe))
    comparisons += aggregate(comparisons)
    dtypes = {resolved_dtype(recipe, t.device) for t in targets}
    atol = args.parity_atol if args.parity_atol is not None else \
        max(DEFAULT_ATOL.get(d, 5e-2) for d in dtypes)
    results = {"schema_version": 1, "recipe": recipe.to_dict(),
               "machine": machine.describe(REPO, available),
               "runs": [r.to_dict() for r in runs], "comparisons": comparisons,
               "parity": parity(parity_groups(runs), atol)}
    if not args.no_charts:
        results["charts"] = charts.draw_all(results, out)
    report.write_json(results, out / "results.json")
    report.write_markdown(results, out / "results.md")
    print(report.markdown(results))
    print(f"bench: wrote {out / 'results.json'}, {out / 'results.md'}"
          + (", charts" if not args.no_charts else ""), file=sys.stderr)
    failed = [r for r in runs if r.status == "failed"]
    refused = [c for c in comparisons if c["status"] == "refused"]
    return 1 if failed or refused or results["parity"]["verdict"] == "disagree" else 0


if __name__ == "__main__":
    sys.exit(main())
