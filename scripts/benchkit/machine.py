"""The machine a benchmark ran on: CPU, cores, memory, GPUs, package versions, git commit.

Read without importing mlx or torch (package versions come from their metadata) and without
running git (the commit is read from ``.git``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("mlx", "mlx-lm", "mlx-metal", "mlx-cuda", "torch", "transformers", "peft", "trl",
            "numpy", "safetensors")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  check=False, capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(repo: Path) -> str | None:
    """HEAD's commit hash from ``.git`` (loose ref or packed-refs); None outside a checkout."""
    git = repo / ".git"
    head = git / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref:"):
        return ref
    name = ref.split(None, 1)[1]
    if (git / name).is_file():
        return (git / name).read_text().strip()
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            if line.endswith(" " + name):
                return line.split()[0]
    return None


def openblas() -> str | None:
    """The OpenBLAS ``mlx_ft`` would load (its candidate list, read without importing
    ``mlx_ft``, whose import loads the library)."""
    import ast

    source = (Path(__file__).resolve().parents[2] / "mlx_ft" / "blas.py").read_text()
    candidates: tuple = ()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CANDIDATES":
            candidates = ast.literal_eval(node.value)
    for pattern in candidates:
        path = pattern.format(arch=platform.machine())
        if os.path.exists(path):
            return path
    return None


def describe(repo: Path, backends: dict[str, dict]) -> dict:
    gpus = sorted({f["gpu"] for f in backends.values() if f.get("gpu")})
    return {"system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "memory_gb": memory_gb(), "gpus": gpus,
            "openblas": openblas() if platform.system() == "Linux" else None,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "backends": sorted(backends), "versions": versions(),
            "git_commit": git_commit(repo)}
