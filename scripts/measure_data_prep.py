"""Time to prepare a large SFT set: first run (tokenise), with one process, second run (cache).

    python scripts/measure_data_prep.py                       # 50,000 chat examples, SmolLM2
    python scripts/measure_data_prep.py --examples 10000 --format parquet

Writes a synthetic chat set (``scripts/benchkit/synthetic.py``: log-normal lengths, a quarter of
the conversations two turns long, half with a system prompt; about 150 tokens each) as JSONL or
parquet in a temporary dir, then runs what ``python -m mlx_ft sft --data ...`` runs before the
model loads (read, validate, render the chat template, tokenise, assistant masks, batch plan:
``algorithms.sft.prepare_data``), each time in a fresh process:

1. first run, ``--data-workers 0`` (automatic: one process per core when it pays), empty cache;
2. first run, ``--data-workers 1`` (one process), empty cache;
3. second run of (1): the tokenisation cache answers.

Prints the seconds of each (the child's own timing of ``prepare_data``, and its wall time with
interpreter start and imports), the cores seen and the load average, which matters on a shared
machine. Nothing is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from algorithms.cli import load_tokenizer
from algorithms.sft import SFTConfig, prepare_data
from converters.models import resolve_model
tokenizer = load_tokenizer(resolve_model({model!r}))
cfg = SFTConfig(data=[{data!r}], max_length=1024, data_workers={workers}, progress=False)
started = time.perf_counter()
prepared = prepare_data(cfg, tokenizer)
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "examples": len(prepared.train.dataset),
                   "tokens": prepared.reports["train"].n_tokens}}))
"""


def write_data(directory: Path, n: int, fmt: str) -> Path:
    from scripts.benchkit.synthetic import write_synthetic

    write_synthetic(directory, "chat", n_train=n, n_valid=0, seed=0)
    (directory / "valid.jsonl").unlink()
    train = directory / "train.jsonl"
    if fmt == "jsonl":
        return train
    import datasets

    datasets.disable_progress_bars()
    out = directory / "train.parquet"
    datasets.load_dataset("json", data_files=str(train), split="train",
                          cache_dir=str(directory / "hf")).to_parquet(str(out))
    train.unlink()
    return out


def run_child(data: Path, model: str, workers: int, cache: Path) -> dict:
    env = {**os.environ, "POSTTRAIN_DATA_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    code = CHILD.format(root=str(ROOT), model=model, data=str(data), workers=workers)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=False,
                            text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-2000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--model", default="smollm2-135m", help="tokenizer (model) to use")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "data", args.examples, args.format)
        runs = [("first run, --data-workers 0 (auto)", 0, tmp / "cache-a"),
                ("first run, --data-workers 1", 1, tmp / "cache-b"),
                ("second run (cache)", 0, tmp / "cache-a")]
        print(f"{args.examples:,} chat examples ({args.format}), tokenizer {args.model}, "
              f"{cores} cores, load average {os.getloadavg()[0]:.1f}")
        print(f"{'run':<38} {'prepare_data s':>15} {'process wall s':>15}")
        for name, workers, cache in runs:
            result = run_child(data, args.model, workers, cache)
            print(f"{name:<38} {result['seconds']:>15.1f} {result['wall']:>15.1f}   "
                  f"({result['examples']:,} examples, {result['tokens']:,} tokens; load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
