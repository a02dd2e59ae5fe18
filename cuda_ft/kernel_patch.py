"""Put the Triton kernels (:mod:`cuda_ft.kernels`) into a loaded transformers model.

``--kernels auto|triton|torch`` decides per part: ``auto`` = Triton on a CUDA GPU when it is
importable, else torch; ``triton`` insists (an error saying why when it cannot run; on a CPU it
runs through ``TRITON_INTERPRET=1``, for tests); ``torch`` = none of them. Modules are not
replaced but re-classed in place (``module.__class__`` becomes a subclass of its own class whose
``forward`` calls the kernel), so parameter names, PEFT adapters, ``state_dict`` and saving are
untouched, and any call the kernel does not cover (a KV cache during generation, LoRA dropout in
training, DoRA) goes to the original ``forward``:

- every RMSNorm (block norms, final norm, Qwen3's q/k norms)  -> :mod:`cuda_ft.kernels.rmsnorm`
- attention: RoPE on Q and K in one kernel                  -> :mod:`cuda_ft.kernels.rope`
  and q/k/v with LoRA as one autograd node (no bias)        -> :mod:`cuda_ft.kernels.lora_qkv`
- the SwiGLU MLP (with or without LoRA): one autograd node  -> :mod:`cuda_ft.kernels.lora_mlp`
- the lm_head + log-softmax (any family with a Linear head) -> :mod:`cuda_ft.kernels.fused_head`

Block patches cover the families in ``FAMILIES``; others keep transformers' code with a one-line
notice. The start-up line says which path each part takes.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import nn

from algorithms.config import ConfigError

from .kernels.runtime import triton_importable, triton_runs_on, why_not

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_SUBCLASSES: dict[tuple[type, type], type] = {}


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Which implementation each part uses ("triton" or "torch") and why."""

    requested: str
    blocks: str
    head: str
    reason: str
    counts: tuple = ()

    def line(self) -> str:
        parts = ", ".join(f"{name} x{n}" for name, n in self.counts) or "none"
        if self.blocks == "triton":
            blocks = f"triton ({parts})"
        else:
            blocks = "torch (transformers' modules)"
        return (f"cuda_ft: kernels={self.requested}: head={self.head} "
                f"({'Triton' if self.head == 'triton' else 'torch'} fused linear + log-softmax), "
                f"blocks={blocks}; {self.reason}")


def check(kernels: str, device: torch.device) -> None:
    """Raise ConfigError when ``--kernels`` cannot be honoured on ``device`` (before loading)."""
    if kernels not in ("auto", "triton", "torch"):
        raise ConfigError(f"--kernels={kernels!r}: must be one of auto, triton, torch")
    if kernels == "triton" and not triton_runs_on(device):
        raise ConfigError(f"--kernels=triton: {why_not(device)}")


def resolve(kernels: str, device: torch.device, model_type: str) -> KernelPlan:
    """The plan for ``--kernels`` on ``device`` for a model of ``model_type``."""
    check(kernels, device)
    if kernels == "torch":
        return KernelPlan(kernels, "torch", "torch", "--kernels torch")
    if kernels == "auto" and not (device.type == "cuda" and triton_importable()):
        why = "no CUDA GPU" if device.type != "cuda" else "Triton is not importable"
        return KernelPlan(kernels, "torch", "torch", f"auto -> torch ({why})")
    if model_type not in FAMILIES:
        return KernelPlan(kernels, "torch", "triton",
                          f"model type {model_type!r} has no Triton block patches "
                          f"({', '.join(FAMILIES)} do): its blocks run transformers' code")
    return KernelPlan(kernels, "triton", "triton",
                      "Triton on CUDA" if device.type == "cuda" else "Triton interpreter")


def apply(hf_model: nn.Module, kernels: str, device: torch.device,
          announce: bool = True) -> KernelPlan:
    """Resolve the plan for ``hf_model``, patch its blocks if Triton runs them, print the line.

    The plan is kept on the model as ``posttrain_kernels`` (read by :func:`plan_of`).
    """
    plan = resolve(kernels, device, getattr(hf_model.config, "model_type", ""))
    if plan.blocks == "triton":
        plan = dataclasses.replace(plan, counts=tuple(patch_blocks(hf_model).items()))
    hf_model.posttrain_kernels = plan
    if announce:
        print(plan.line(), file=sys.stderr, flush=True)
    return plan


def plan_of(model: nn.Module) -> KernelPlan | None:
    """The plan :func:`apply` attached (to the HF model; PEFT's wrapper forwards the lookup)."""
    return getattr(model, "posttrain_kernels", None)


def reclass(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``mixin`` + its own class (once; cached per pair)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}",
                                (mixin, cls), {})
    module.__class__ = _SUBCLASSES[key]


def patch_blocks(hf_model: nn.Module) -> dict[str, int]:
    """Re-class the RMSNorms, attentions and MLPs of ``hf_model``; counts by kind."""
    from .kernel_modules import FusedMLPMixin, RopeAttentionMixin, TritonRMSNormMixin

    counts = {"rmsnorm": 0, "rope": 0, "mlp": 0}
    for module in hf_model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            reclass(module, TritonRMSNormMixin)
            counts["rmsnorm"] += 1
        elif name.endswith("Attention") and all(hasattr(module, a) for a in
                                                ("q_proj", "k_proj", "v_proj", "o_proj")):
            reclass(module, RopeAttentionMixin)
            counts["rope"] += 1
        elif name.endswith("MLP") and all(hasattr(module, a) for a in
                                          ("gate_proj", "up_proj", "down_proj", "act_fn")):
            reclass(module, FusedMLPMixin)
            counts["mlp"] += 1
    return counts


def head_impl(model: Any) -> str:
    """"triton" or "torch": the fused head's implementation for ``model`` (torch if unplanned)."""
    plan = plan_of(model)
    return plan.head if plan is not None else "torch"
