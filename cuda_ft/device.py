"""Choose the torch device and compute dtype once, and say which and why.

The rule (backends are chosen, not guessed silently): a CUDA GPU when torch sees one,
else the CPU. ``dtype="auto"`` means bfloat16 on a GPU (the native training precision of modern
NVIDIA cards) and float32 on the CPU (CPU bf16 matmuls are slow and the CPU path is where parity
with MLX is tested). An explicit dtype is honoured everywhere. The choice is printed to stderr
once per process, e.g. ``cuda_ft: device=cpu dtype=float32 (no CUDA GPU found)``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_announced: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """Where the model runs and in which precision, with the reason shown to the user."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def line(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"cuda_ft: device={self.device} dtype={dtype} ({self.reason})"


def choose_device(dtype: str = "auto", announce: bool = True) -> DeviceChoice:
    """Pick CUDA if available else CPU, and the compute dtype for ``dtype`` (auto/float32/...).

    Raises ValueError naming the flag for an unknown dtype, and for float16/bfloat16 requested
    on a GPU that cannot run them.
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"--dtype={dtype!r}: must be one of auto, {', '.join(_DTYPES)}")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        if dtype == "auto":
            bf16 = torch.cuda.is_bf16_supported()
            chosen = torch.bfloat16 if bf16 else torch.float32
            why = f"CUDA GPU {name}; auto dtype = " + (
                "bfloat16" if bf16 else "float32 because this GPU has no bfloat16")
        else:
            chosen = _DTYPES[dtype]
            if chosen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                raise ValueError(f"--dtype=bfloat16: the GPU {name} does not support bfloat16")
            why = f"CUDA GPU {name}; dtype set by --dtype"
    else:
        device = torch.device("cpu")
        chosen = torch.float32 if dtype == "auto" else _DTYPES[dtype]
        why = "no CUDA GPU found" if dtype == "auto" else "no CUDA GPU found; dtype set by --dtype"
    choice = DeviceChoice(device=device, dtype=chosen, reason=why)
    key = (str(device), str(chosen))
    if announce and key not in _announced:
        _announced.add(key)
        print(choice.line(), file=sys.stderr, flush=True)
    return choice
