"""Can Triton kernels run here, and on which tensors?

Triton compiles for CUDA GPUs. On a machine with no GPU its interpreter (``TRITON_INTERPRET=1``,
read when a kernel is *defined*, so it must be set before :mod:`cuda_ft.kernels` is imported)
runs the same kernels on CPU tensors with numpy: slow, float32 only (it computes bfloat16
wrongly and has no libdevice), but exact enough to test every kernel against its reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (it is a Linux-only wheel)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install is "not importable"
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels can run on tensors of ``device``: a CUDA device with Triton importable,
    or any device under the interpreter."""
    if not triton_importable():
        return False
    return device.type == "cuda" or interpreting()


def why_not(device: torch.device) -> str:
    """One sentence saying why :func:`triton_runs_on` is False for ``device``."""
    if not triton_importable():
        return "Triton is not importable here (pip install triton; Linux only)"
    return (f"Triton kernels need a CUDA GPU and the model is on {device.type} "
            "(TRITON_INTERPRET=1 runs them on the CPU through Triton's interpreter, for testing)")
