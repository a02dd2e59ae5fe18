"""Kernel micro-benchmark: each Triton kernel against its torch reference and Liger's equivalent.

    python scripts/bench_kernels.py --out runs/kernels          # realistic shapes on a GPU
    python scripts/bench_kernels.py --quick                     # one small shape per kernel

Per implementation and shape: median milliseconds of forward + backward (CUDA events after
warm-up; wall clock on the CPU) and the peak CUDA memory the call allocates above what was
allocated before it (inputs excluded; not measured on the CPU). "ours" is the Triton kernel on
a GPU (the torch twin of the fused head on the CPU, where Triton cannot run), "torch" the
reference the kernel is tested against (what transformers / TRL run: materialised logits for
the head), "liger" Liger-Kernel's function when ``liger_kernel`` is importable. Writes
``results.json`` and ``results.md`` into ``--out`` and prints the table. Numbers, never
assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cuda_ft.kernels.runtime import triton_runs_on

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
TRITON = triton_runs_on(DEVICE) and GPU

# (N tokens, hidden, vocab): SmolLM2-135M, Llama-3.2-1B, Qwen2.5-7B, a long Qwen batch
HEAD_SHAPES = [(8192, 576, 49152), (16384, 2048, 128256), (16384, 4096, 151936),
               (32768, 2048, 151936)]
NORM_SHAPES = [(16384, 2048), (16384, 4096)]
ROPE_SHAPES = [(4, 32, 8, 4096, 128)]  # batch, q heads, kv heads, tokens, head dim
SWIGLU_SHAPES = [(16384, 8192)]
MLP_SHAPES = [(16384, 2048, 8192, 16)]  # tokens, hidden, intermediate, LoRA rank
QKV_SHAPES = [(16384, 2048, 512, 16)]  # tokens, hidden, k/v width, LoRA rank
QUICK = {"head": [(256, 64, 1000)], "rmsnorm": [(256, 64)], "rope": [(1, 4, 2, 64, 32)],
         "swiglu": [(256, 128)], "lora_mlp": [(256, 64, 128, 4)],
         "lora_qkv": [(256, 64, 32, 4)]}


def liger() -> object | None:
    try:
        from liger_kernel.transformers import functional
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    return functional


def measure(step: Callable[[], None], reps: int) -> dict:
    """Median ms of ``step`` (forward + backward) and its peak extra CUDA memory (GB)."""
    for _ in range(2):
        step()
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if GPU else None
    return {"ms": statistics.median(times), "peak_gb": peak}


def _param(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE).requires_grad_(grad)


def _backward(out: torch.Tensor, *tensors: torch.Tensor) -> None:
    out.float().sum().backward()
    for t in tensors:
        t.grad = None


def head_cases(shape, lig) -> dict[str, Callable[[], None]]:
    from cuda_ft.kernels.fused_head import fused_linear_logprobs

    n, h, v = shape
    hidden, weight = _param(n, h), _param(v, h, scale=0.02, grad=False)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    impl = "triton" if TRITON else "torch"

    def ours():
        _backward(fused_linear_logprobs(hidden, weight, targets, impl=impl).logps, hidden)

    def reference():  # what transformers + TRL do: all logits, upcast, log-softmax, gather
        logits = (hidden @ weight.t()).float()
        logps = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        _backward(logps, hidden)

    cases = {"ours": ours, "torch": reference}
    if lig is not None:
        cases["liger"] = lambda: _backward(lig.liger_fused_linear_cross_entropy(
            hidden, weight, targets, reduction="sum"), hidden)
    return cases


def rmsnorm_cases(shape, lig):
    from cuda_ft.kernels.rmsnorm import reference_rms_norm, rms_norm

    x, w = _param(*shape), _param(shape[1])
    cases = {"ours": lambda: _backward(rms_norm(x, w, 1e-6), x, w),
             "torch": lambda: _backward(reference_rms_norm(x, w, 1e-6), x, w)}
    if lig is not None:
        cases["liger"] = lambda: _backward(lig.liger_rms_norm(x, w, 1e-6, in_place=False), x, w)
    return cases


def rope_cases(shape, lig):
    from cuda_ft.kernels.rope import apply_rope, reference_rope

    b, hq, hk, t, d = shape
    q, k = _param(b, hq, t, d), _param(b, hk, t, d)
    angles = torch.arange(t, device=DEVICE)[:, None] * (1e-4 ** (torch.arange(
        0, d, 2, device=DEVICE) / d))
    emb = torch.cat([angles, angles], -1)[None].expand(b, -1, -1)
    cos, sin = emb.cos().to(DTYPE), emb.sin().to(DTYPE)

    def run(fn):
        def step():
            qo, ko = fn(q, k, cos, sin)
            (qo.float().sum() + ko.float().sum()).backward()
            q.grad = k.grad = None
        return step

    cases = {"ours": run(apply_rope), "torch": run(reference_rope)}
    if lig is not None:
        cases["liger"] = run(lig.liger_rope)
    return cases


def swiglu_cases(shape, lig):
    from cuda_ft.kernels.swiglu import reference_swiglu, swiglu

    g, u = _param(*shape), _param(*shape)
    cases = {"ours": lambda: _backward(swiglu(g, u), g, u),
             "torch": lambda: _backward(reference_swiglu(g, u), g, u)}
    if lig is not None:
        cases["liger"] = lambda: _backward(lig.liger_swiglu(g, u), g, u)
    return cases


def lora_mlp_cases(shape, lig):
    from cuda_ft.kernels.lora_mlp import Projection, lora_mlp

    n, h, inter, r = shape
    x = _param(n, h)

    def proj(out, inp):
        return Projection(_param(out, inp, scale=0.02, grad=False),
                          torch.randn(r, inp, device=DEVICE).mul_(0.02).requires_grad_(),
                          torch.randn(out, r, device=DEVICE).mul_(0.02).requires_grad_(), 2.0)

    gate, up, down = proj(inter, h), proj(inter, h), proj(h, inter)
    params = [x] + [t for p in (gate, up, down) for t in p[1:3]]

    def unfused():  # PEFT's LoRA Linear + transformers' MLP, under autocast as in training
        def p(v, q):
            return v @ q.weight.t() + q.scale * (v @ q.lora_a.to(DTYPE).t()) @ q.lora_b.to(
                DTYPE).t()
        _backward(p(torch.nn.functional.silu(p(x, gate)) * p(x, up), down), *params)

    return {"ours": lambda: _backward(lora_mlp(x, gate, up, down,
                                               impl="triton" if TRITON else "torch"), *params),
            "torch": unfused}


def lora_qkv_cases(shape, lig):
    from cuda_ft.kernels.lora_mlp import Projection
    from cuda_ft.kernels.lora_qkv import lora_qkv

    n, h, kv, r = shape
    x = _param(n, h)

    def proj(out):
        return Projection(_param(out, h, scale=0.02, grad=False),
                          torch.randn(r, h, device=DEVICE).mul_(0.02).requires_grad_(),
                          torch.randn(out, r, device=DEVICE).mul_(0.02).requires_grad_(), 2.0)

    q, k, v = proj(h), proj(kv), proj(kv)
    params = [x] + [t for p in (q, k, v) for t in p[1:3]]

    def unfused():
        outs = [x @ p.weight.t() + p.scale * (x @ p.lora_a.to(DTYPE).t()) @ p.lora_b.to(
            DTYPE).t() for p in (q, k, v)]
        _backward(torch.cat([o.flatten() for o in outs]), *params)

    def ours():
        _backward(torch.cat([o.flatten() for o in lora_qkv(x, q, k, v)]), *params)

    return {"ours": ours, "torch": unfused}


KERNELS = {"head": (head_cases, HEAD_SHAPES), "rmsnorm": (rmsnorm_cases, NORM_SHAPES),
           "rope": (rope_cases, ROPE_SHAPES), "swiglu": (swiglu_cases, SWIGLU_SHAPES),
           "lora_mlp": (lora_mlp_cases, MLP_SHAPES), "lora_qkv": (lora_qkv_cases, QKV_SHAPES)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/bench_kernels.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="*", default=None, choices=list(KERNELS),
                   help="default: all on a GPU; head, lora_mlp, lora_qkv on the CPU")
    p.add_argument("--quick", action="store_true", help="one small shape per kernel")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="dir for results.json / results.md")
    args = p.parse_args(argv)
    cpu_only = {"rmsnorm", "rope", "swiglu"} & set(args.kernels or [])
    if not TRITON and cpu_only:
        print(f"error: --kernels {' '.join(sorted(cpu_only))}: Triton-only kernels need a CUDA "
              "GPU", file=sys.stderr)
        return 2
    args.kernels = args.kernels or (list(KERNELS) if TRITON else ["head", "lora_mlp", "lora_qkv"])
    lig = liger()
    rows = []
    for name in args.kernels:
        build, shapes = KERNELS[name]
        for shape in (QUICK[name] if args.quick else shapes):
            for impl, step in build(shape, lig).items():
                try:
                    result = measure(step, args.reps)
                except torch.OutOfMemoryError:
                    result = {"ms": None, "peak_gb": None, "error": "out of memory"}
                    torch.cuda.empty_cache()
                rows.append({"kernel": name, "shape": list(shape), "impl": impl, **result})
                print(f"bench_kernels: {name} {shape} {impl}: {result}", file=sys.stderr,
                      flush=True)
            torch.cuda.empty_cache() if GPU else None
    device = torch.cuda.get_device_name(0) if GPU else "cpu"
    header = (f"device {device}, dtype {str(DTYPE).removeprefix('torch.')}, triton "
              f"{'on' if TRITON else 'off'}, liger {'importable' if lig else 'not importable'}")
    table = ["| kernel | shape | impl | ms (fwd+bwd) | peak GB | vs torch time | vs torch mem |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = next(r for r in rows if r["kernel"] == row["kernel"] and r["shape"] == row["shape"]
                   and r["impl"] == "torch")

        def ratio(key, row=row, ref=ref):
            return f"{row[key] / ref[key]:.2f}x" if row.get(key) and ref.get(key) else "-"

        ms = f"{row['ms']:.3f}" if row.get("ms") is not None else row.get("error", "-")
        peak = f"{row['peak_gb']:.3f}" if row.get("peak_gb") is not None else "-"
        table.append(f"| {row['kernel']} | {tuple(row['shape'])} | {row['impl']} | {ms} | {peak} "
                     f"| {ratio('ms')} | {ratio('peak_gb')} |")
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"device": device, "header": header,
                                                      "rows": rows}, indent=2) + "\n")
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
