"""Tolerances of every kernel against its reference, per dtype: the one table the tests use.

Each entry is ``(atol, rtol)`` on values and on gradients, the gradients compared after
dividing by the reference's largest magnitude (so one row fits every shape).

How the rows were set:

- float32: the Triton interpreter on the CPU (``TRITON_INTERPRET=1``, the CI tier) and torch on
  the CPU. Measured worst cases on the test shapes: fused head 2e-5 (gradients, relative),
  RMSNorm 1.2e-6, RoPE 0 (same arithmetic), SwiGLU 2.4e-7, LoRA MLP 1.5e-5 (relative); the
  bounds below leave ~10x room. On a GPU, float32 matmuls in cuBLAS may use TF32 unless
  ``torch.backends.cuda.matmul.allow_tf32`` is off; the gpu tier turns it off.
- bfloat16 / float16 (gpu tier only; the interpreter computes bf16 wrongly): following Cut
  Cross-Entropy's rule the kernel and the reference, both run in the low dtype, are compared
  with a float32 oracle, and the kernel must be no worse than the reference by more than the
  factor ``LOW_PRECISION_SLACK``; the absolute rows below are the outer bound, set from the
  precision of the dtype (bf16: 8 bits of mantissa, 2^-8 = 3.9e-3 relative per rounding).
  They are to be confirmed by ``scripts/gpu_check.sh`` on a GPU (no GPU was at hand when they
  were written).
"""

from __future__ import annotations

import torch

# kernel -> dtype -> (atol, rtol)
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "fused_head": {torch.float32: (2e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2),
                   torch.float16: (2e-2, 1e-2)},
    "rmsnorm": {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2),
                torch.float16: (4e-3, 4e-3)},
    "rope": {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2),
             torch.float16: (2e-3, 2e-3)},
    "swiglu": {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2),
               torch.float16: (4e-3, 4e-3)},
    "lora_mlp": {torch.float32: (2e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2),
                 torch.float16: (2e-2, 1e-2)},
    "lora_qkv": {torch.float32: (2e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2),
                 torch.float16: (2e-2, 1e-2)},
    # a whole patched model (loss and every trainable gradient) against the unpatched one
    "model": {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2),
              torch.float16: (2e-2, 2e-2)},
}

LOW_PRECISION_SLACK = 1.5


def tolerance(kernel: str, dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for ``kernel`` at ``dtype`` (a KeyError names what exists)."""
    return TOLERANCES[kernel][dtype]
