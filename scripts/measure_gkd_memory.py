"""Peak memory of GKD with SmolLM2-135M-Instruct as student and a random-init 360M teacher
(SmolLM2-360M's shape and tokenizer), each run in a subprocess, side by side with TRL's GKD loss
on the same rows and with SFT of the student alone.

    python scripts/measure_gkd_memory.py                      # 8 rows of ~170 tokens
    python scripts/measure_gkd_memory.py --rows 16 --completion-words 200 --chunk 256

Rows: arithmetic prompts with a long data completion (``--lmbda 0``: no sampling, so the runs
are the same rows on every backend). Runs, each 3 optimiser steps, float32 on the CPU, LoRA:

- ``gkd mlx`` / ``gkd torch``: ``python -m mlx_ft|cuda_ft gkd`` (the chunked
  ``teacher_divergence`` output; ``--logprob-chunk-size`` tokens of both heads' logits at once);
- ``sft mlx`` / ``sft torch``: the student alone on the same rows (what distilling adds);
- ``trl gkd loss``: TRL's ``GKDTrainer.generalized_jsd_loss`` on both models' full logits with
  a backward pass, the same rows, a PEFT LoRA student (rank 8, every linear layer).

Peak RSS is the child's ``ru_maxrss`` (``os.wait4``); the MLX runs also report MLX's own
allocator peak (``memory/mlx_peak_gb`` in metrics.jsonl). ``logits`` is the size of ONE model's
float32 ``[rows, tokens, vocabulary]`` logits for the batch, what neither GKD run materialises.
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

TRL_SNIPPET = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDTrainer
student_dir, teacher_dir, rows_file, beta = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(student_dir)
from peft import LoraConfig, get_peft_model
student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
student = get_peft_model(student, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
rows = [json.loads(x) for x in open(rows_file)]
texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
labels = enc["input_ids"].clone()
labels[enc["attention_mask"] == 0] = -100
for _ in range(3):
    logits = student(**enc).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**enc).logits[:, :-1]
    loss = GKDTrainer.generalized_jsd_loss(logits, t_logits, labels[:, 1:], beta=float(beta))
    loss.backward()
    student.zero_grad()
print(json.dumps({"tokens": int(enc["input_ids"].numel())}))
"""


def run_measured(argv: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GiB, seconds, stdout) of one child process; raises when it fails."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRL_EXPERIMENTAL_SILENCE="1")
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    out = child.stdout.read().decode() if child.stdout else ""
    err = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024**2, time.perf_counter() - start, out


def write_rows(directory: Path, rows: int, words: int) -> Path:
    source = ROOT / "scripts" / "data" / "grpo_arith" / "train.jsonl"
    prompts = [json.loads(x) for x in source.read_text().splitlines()][:rows]
    filler = " ".join(["the answer follows from adding the two numbers"] * (words // 8 + 1))
    lines = [json.dumps({"prompt": p["prompt"], "completion": [
        {"role": "assistant", "content": " ".join(filler.split()[:words]) + " " + p["answer"]}]})
        for p in prompts]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--completion-words", type=int, default=120)
    parser.add_argument("--chunk", type=int, default=512, help="--logprob-chunk-size")
    parser.add_argument("--teacher-size", default="360m")
    parser.add_argument("--skip", nargs="*", default=[], help="runs to skip (e.g. trl)")
    args = parser.parse_args()

    from converters.models import resolve_model
    from converters.random_init import make_random_model

    student = resolve_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = make_random_model(tmp / "teacher", args.teacher_size, dtype="bfloat16",
                                    tokenizer_dir=student)
        data = write_rows(tmp / "data", args.rows, args.completion_words).parent
        common = ["--model", str(student), "--data", str(data), "--steps", "3",
                  "--batch-size", str(args.rows), "--max-length", "512", "--dtype", "float32",
                  "--no-progress", "--logprob-chunk-size", str(args.chunk)]
        runs = {}
        for backend in ("mlx", "torch"):
            prog = {"mlx": "mlx_ft", "torch": "cuda_ft"}[backend]
            runs[f"gkd {backend}"] = [sys.executable, "-m", prog, "gkd", *common,
                                      "--teacher", str(teacher), "--lmbda", "0",
                                      "--prompts-per-step", str(args.rows),
                                      "--max-completion-length", "256",
                                      "--log-completions-every", "0",
                                      "--run-dir", str(tmp / f"gkd_{backend}")]
            runs[f"sft {backend}"] = [sys.executable, "-m", prog, "sft", *common,
                                      "--run-dir", str(tmp / f"sft_{backend}")]
        runs["trl gkd loss"] = [sys.executable, "-c", TRL_SNIPPET, str(student), str(teacher),
                                str(data / "train.jsonl"), "0.5"]
        print(f"student SmolLM2-135M, teacher random {args.teacher_size} (SmolLM2 shape), "
              f"{args.rows} rows, chunk {args.chunk}; float32 CPU\n")
        print("| run | peak RSS (GiB) | MLX peak (GiB) | tokens / row | seconds |")
        print("|---|---|---|---|---|")
        for label, argv in runs.items():
            if label.split()[0] in args.skip or label in args.skip:
                continue
            rss, seconds, out = run_measured(argv)
            mlx_peak, tokens = "", ""
            run_dir = Path(argv[argv.index("--run-dir") + 1]) if "--run-dir" in argv else None
            if run_dir is not None:
                last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
                        .splitlines() if '"train"' in x][-1]
                mlx_peak = f"{last.get('memory/mlx_peak_gb', 0) / 1.073741824:.2f}" \
                    if "memory/mlx_peak_gb" in last else ""
                tokens = f"{last['tokens'] / 3 / args.rows:.0f}"
            else:
                tokens = f"{json.loads(out.splitlines()[-1])['tokens'] / args.rows:.0f}"
            print(f"| {label} | {rss:.2f} | {mlx_peak} | {tokens} | {seconds:.0f} |",
                  flush=True)
        vocab = 49152
        print(f"\none model's float32 logits for the batch: {args.rows} x ~{tokens} x {vocab} "
              f"x 4 bytes = {args.rows * float(tokens or 0) * vocab * 4 / 1024**3:.2f} GiB")


if __name__ == "__main__":
    main()
