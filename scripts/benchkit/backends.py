"""Which backends this machine has: mlx on Metal / CUDA / CPU, torch on CUDA / CPU.

Detection runs in a throw-away subprocess per framework, so the harness itself never imports
mlx or torch (and cannot be distorted by them). A target names a framework and a device:

    mlx-metal   python -m mlx_ft    on Apple's GPU
    mlx-cuda    python -m mlx_ft    on an NVIDIA GPU (mlx[cuda])
    mlx-cpu     python -m mlx_ft    on the CPU (mlx[cpu]; OpenBLAS preloaded on Linux)
    torch-cuda  python -m cuda_ft   on an NVIDIA GPU
    torch-cpu   python -m cuda_ft   on the CPU
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

TARGETS = ("mlx-metal", "mlx-cuda", "mlx-cpu", "torch-cuda", "torch-cpu")

_MLX_PROBE = """
import json
import mlx_ft  # loads OpenBLAS first on Linux, as the real runs do
import mlx.core as mx
metal = hasattr(mx, "metal") and mx.metal.is_available()
cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
print(json.dumps({"version": mx.__version__, "metal": bool(metal), "cuda": bool(cuda)}))
"""
_TORCH_PROBE = """
import json
import torch
cuda = torch.cuda.is_available()
print(json.dumps({"version": torch.__version__, "cuda": cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None}))
"""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str        # e.g. "mlx-cpu"
    framework: str   # "mlx" | "torch"
    device: str      # "cpu" | "gpu"
    package: str     # "mlx_ft" | "cuda_ft"


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(TARGETS)}")
    framework, kind = name.split("-")
    return Target(name, framework, "cpu" if kind == "cpu" else "gpu",
                  "mlx_ft" if framework == "mlx" else "cuda_ft")


def _probe(code: str, cwd: str) -> dict | None:
    try:
        out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                             text=True, timeout=300, cwd=cwd)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def detect(cwd: str) -> dict[str, dict]:
    """``{target name: facts}`` for every target this machine can run."""
    found: dict[str, dict] = {}
    mlx = _probe(_MLX_PROBE, cwd)
    if mlx is not None:
        if mlx["metal"]:
            found["mlx-metal"] = mlx
        if mlx["cuda"]:
            found["mlx-cuda"] = mlx
        found["mlx-cpu"] = mlx
    torch = _probe(_TORCH_PROBE, cwd)
    if torch is not None:
        if torch["cuda"]:
            found["torch-cuda"] = torch
        found["torch-cpu"] = torch
    return found


def select(requested: list[str] | None, available: dict[str, dict]) -> list[Target]:
    """The targets to run: those requested (an unavailable one is an error naming what
    exists), or every available one."""
    if not requested:
        return [target(n) for n in TARGETS if n in available]
    chosen = []
    for name in requested:
        t = target(name)
        if name not in available:
            have = ", ".join(available) or "none"
            raise ValueError(f"--backends {name}: not available on this machine (found: {have})")
        chosen.append(t)
    return chosen
