"""Scaling across processes: one recipe, the same GLOBAL batch, on 1, 2, ... processes.

    python scripts/bench_distributed.py --backend torch --processes 1 2 --model smollm2-135m
    python scripts/bench_distributed.py --backend mlx --processes 1 2 --batch-size 8
    python scripts/bench_distributed.py --backend torch --parallel fsdp --processes 1 2

Each count runs ``torchrun --nproc-per-node N -m cuda_ft`` (``--parallel ddp|fsdp``) or
``mlx.launch -n N -- python -m mlx_ft`` (ring on 127.0.0.1) with ``--batch-size`` = global batch
/ N, so every run trains on the same examples in the same order and its loss curve must match
the one-process curve. Prints tokens/s (real tokens of the whole job, after ``--warmup``
steps), the median step time, the speed-up over the first count, rank 0's peak memory and the
largest loss difference from the first count; writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make ``scripts.benchkit`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchkit.machine import cpu_name, versions
from scripts.benchkit.measure import memory_from_metrics, read_jsonl, steps_from_metrics, summarize
from scripts.benchkit.recipe import Recipe, our_flags, resolve_data, resolve_model

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["torch", "mlx"], required=True)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="torch only")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="synthetic:chat")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL micro-batch")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP threads per process (0 = cores / processes)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default="")
    return p


def _ports(n: int) -> int:
    """A first port with ``n`` free ports after it (mlx.launch's ring takes consecutive)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n >= 65536:
            continue
        try:
            for i in range(1, n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue


def command(backend: str, n: int, parallel: str) -> list[str]:
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                "--master-addr", "127.0.0.1", "--master-port", str(_ports(1)), "-m", "cuda_ft",
                "sft", "--parallel", parallel]
    launcher = Path(sys.executable).with_name("mlx.launch")
    launcher = str(launcher) if launcher.is_file() else shutil.which("mlx.launch") or "mlx.launch"
    return [launcher, "-n", str(n), "--starting-port", str(_ports(n)), "--python",
            sys.executable, "--", "-m", "mlx_ft", "sft"]


def run_one(args: argparse.Namespace, recipe: Recipe, model: Path, data: Path, out: Path,
            n: int) -> dict:
    run_dir = out / f"{args.backend}-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    per_rank = Recipe(**{**recipe.to_dict(), "batch_size": recipe.batch_size // n})
    flags = our_flags(per_rank, model, data, run_dir / "train", args.dtype)
    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [*command(args.backend, n, args.parallel), *flags, "--no-plots"]
    with (run_dir / "log.txt").open("w") as log:
        done = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout, check=False)
    records = read_jsonl(run_dir / "train" / "metrics.jsonl")
    steps = steps_from_metrics(records)
    if done.returncode or len(steps) < recipe.steps:
        tail = (run_dir / "log.txt").read_text()[-1500:]
        raise RuntimeError(f"{n} process(es): exit {done.returncode}, {len(steps)} steps\n{tail}")
    return {"processes": n, "per_rank_batch": per_rank.batch_size, "threads": threads,
            "command": cmd, **summarize(steps, recipe.warmup),
            "losses": [s["loss"] for s in steps], "memory_gb": memory_from_metrics(records)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [n for n in args.processes if n < 1 or args.batch_size % n]
    if bad:
        print(f"error: --batch-size {args.batch_size} must split evenly over "
              f"{bad[0]} processes", file=sys.stderr)
        return 2
    recipe = Recipe(model=args.model, data=args.data, batch_size=args.batch_size,
                    max_length=args.max_length, steps=args.steps, warmup=args.warmup,
                    dtype=args.dtype)
    recipe.validate()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPO / "runs" / "bench-distributed" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(recipe, out.parent / "models")
    data = resolve_data(recipe, out)
    results = []
    for n in args.processes:
        try:
            results.append(run_one(args, recipe, model, data, out, n))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    base = results[0]
    print(f"{args.backend} ({args.parallel if args.backend == 'torch' else 'all_sum'}), "
          f"{model.name}, global batch {args.batch_size} x {args.max_length} tokens, "
          f"{cpu_name()}, {os.cpu_count()} cores")
    print(f"{'processes':>9} {'batch/rank':>10} {'tokens/s':>9} {'step s':>7} {'speed-up':>8} "
          f"{'peak GB':>8} {'max |dloss|':>11}")
    for r in results:
        dloss = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["max_loss_difference"] = dloss
        print(f"{r['processes']:>9} {r['per_rank_batch']:>10} {r['tokens_per_s']:>9.1f} "
              f"{r['step_time']['median']:>7.2f} {r['speedup']:>7.2f}x "
              f"{max(r['memory_gb'].values(), default=0):>8.2f} {dloss:>11.2e}")
    (out / "results.json").write_text(json.dumps(
        {"backend": args.backend, "parallel": args.parallel, "recipe": recipe.to_dict(),
         "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), **versions()},
         "runs": results}, indent=2))
    print(f"-> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
