"""Peak memory of hf-to-mlx / mlx-to-hf, each run as `python -m converters ...` in a subprocess.

    python scripts/measure_convert_memory.py                        # SmolLM2-135M and a ~1B llama
    python scripts/measure_convert_memory.py --skip-1b --max-shard-size 1GiB,100MB

Models: SmolLM2-135M-Instruct from `converters.models.resolve_model("smollm2-135m")` (float32,
one 513 MiB shard), and a random-init ~1.2B llama (TinyLlama shape, bfloat16, SmolLM2 vocab)
written in a temporary dir tensor by tensor with `converters.shards.ShardWriter`, so building it
never holds more than one shard either. Nothing is kept: all outputs live in a temp dir.

Peak RSS is the child's `ru_maxrss` from `os.wait4` (Linux reports KiB). The baseline row is a
child that only imports what a conversion imports, so "peak - baseline" is what converting costs.
Streaming means that cost tracks the largest output shard (plus one tensor in flight), not the
model size: compare the rows for the two shard sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.shards import parse_size, read_layout

# TinyLlama-1.1B's shape with SmolLM2's 49,152-token vocabulary: 1.17B parameters.
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 49152}
IMPORTS = "import mlx.core, mlx_lm.models.llama, converters.hf_mlx, converters.__main__"


def run_measured(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process; raises when it fails."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    stderr = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def build_1b(out: Path, tokenizer_dir: Path | None, max_shard_bytes: int) -> Path:
    """Write a random-init bfloat16 llama of shape ONE_B, one tensor at a time."""
    import json

    import mlx.core as mx

    from converters.shards import ShardWriter

    c = ONE_B
    hidden, inter, heads, kv = (c["hidden_size"], c["intermediate_size"],
                                c["num_attention_heads"], c["num_key_value_heads"])
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (c["vocab_size"], hidden)})
    out.mkdir(parents=True)
    writer = ShardWriter(out, max_shard_bytes, {"format": "pt"})
    key = mx.random.key(0)
    for name, shape in shapes.items():
        key, sub = mx.random.split(key)
        if len(shape) == 1:
            value = mx.ones(shape, dtype=mx.bfloat16)
        else:
            value = (mx.random.normal(shape, key=sub) * 0.02).astype(mx.bfloat16)
        writer.add(name, value)
        del value
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **ONE_B,
              "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def largest_shard_mib(model_dir: Path) -> float:
    files = {info.file for info in read_layout(model_dir).values()}
    return max(f.stat().st_size for f in files) / 2**20


def measure(name: str, src: Path, work: Path, shard_size: str) -> list[tuple]:
    rows = []
    mlx_dir, q_dir, hf_dir = (work / f"{name}-{shard_size}-{kind}" for kind in ("mlx", "q4", "hf"))
    runs = [("hf-to-mlx", src, mlx_dir, []), ("hf-to-mlx --bits 4", src, q_dir, ["--bits", "4"]),
            ("mlx-to-hf", mlx_dir, hf_dir, [])]
    for verb, source, out, extra in runs:
        argv = [sys.executable, "-m", "converters", verb.split()[0], str(source), str(out),
                "--max-shard-size", shard_size, *extra]
        peak, seconds = run_measured(argv)
        rows.append((name, verb, shard_size, largest_shard_mib(source), largest_shard_mib(out),
                     peak, seconds))
        print(f"  {verb:<20} peak {peak:8.0f} MiB  {seconds:6.1f} s", flush=True)
    for out in (mlx_dir, q_dir, hf_dir):
        shutil.rmtree(out)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-shard-size", default="1GiB,100MB",
                        help="comma-separated output shard limits to try (default: %(default)s)")
    parser.add_argument("--skip-1b", action="store_true", help="only measure SmolLM2-135M")
    args = parser.parse_args()
    sizes = args.max_shard_size.split(",")
    for size in sizes:
        parse_size(size)

    from converters.models import resolve_model

    smollm = resolve_model("smollm2-135m")
    baseline, _ = run_measured([sys.executable, "-c", IMPORTS])
    print(f"baseline (imports only): {baseline:.0f} MiB", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        work = Path(tmp)
        models = [("smollm2-135m", smollm)]
        if not args.skip_1b:
            print("building the ~1B random-init llama ...", flush=True)
            code = ("from pathlib import Path; "
                    "from scripts.measure_convert_memory import build_1b; "
                    f"build_1b(Path({str(work / 'llama-1b')!r}), Path({str(smollm)!r}), "
                    f"{parse_size('1GiB')})")
            peak, seconds = run_measured([sys.executable, "-c", code])
            print(f"  built in {seconds:.0f} s, peak {peak:.0f} MiB", flush=True)
            models.append(("llama-1b-random", work / "llama-1b"))
        for name, src in models:
            size_mib = sum(i.nbytes for i in read_layout(src).values()) / 2**20
            print(f"{name}: {size_mib:.0f} MiB of weights", flush=True)
            for size in sizes:
                rows.extend(measure(name, src, work, size))
    print(f"\n| model | verb | --max-shard-size | largest input shard MiB | largest output shard"
          f" MiB | peak RSS MiB | peak - baseline ({baseline:.0f}) MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, verb, size, shard_in, shard_out, peak, seconds in rows:
        print(f"| {name} | {verb} | {size} | {shard_in:.0f} | {shard_out:.0f} | {peak:.0f} | "
              f"{peak - baseline:.0f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
