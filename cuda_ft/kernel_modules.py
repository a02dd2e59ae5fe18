"""The ``forward`` methods :mod:`cuda_ft.kernel_patch` gives re-classed transformers modules.

Each mixin is placed before the module's own class, so ``super().forward`` is transformers'
code: the fallback for every call a kernel does not cover. The attention forward is that of
transformers' Llama / Mistral / Qwen2 / Qwen3 attention (q/k/v projections, Qwen3's per-head
q/k norms, RoPE, the configured attention function, o projection) with RoPE in one kernel and
the three projections (with their LoRA adapters) in one autograd node where they allow it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .kernels.lora_mlp import Projection, lora_mlp
from .kernels.lora_qkv import lora_qkv
from .kernels.rmsnorm import rms_norm
from .kernels.rope import apply_rope


class TritonRMSNormMixin:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class RopeAttentionMixin:
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                **kwargs):
        if position_embeddings is None or kwargs.get("cache") is not None \
                or kwargs.get("past_key_values") is not None:
            return super().forward(hidden_states=hidden_states,
                                   position_embeddings=position_embeddings,
                                   attention_mask=attention_mask, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        parts = [projection(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
        if all(p is not None for p in parts):  # q/k/v (+ LoRA) in one autograd node
            q, k, v = lora_qkv(hidden_states, *parts)
        else:  # a bias (Qwen2), DoRA, active LoRA dropout: the modules themselves
            q, k, v = (m(hidden_states) for m in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q.view(hidden_shape), k.view(hidden_shape)
        v = v.view(hidden_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        attention: Callable = _attention_function(self.config._attn_implementation,
                                                  ALL_ATTENTION_FUNCTIONS)
        if hasattr(self, "sliding_window"):
            kwargs.setdefault("sliding_window", self.sliding_window)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _attention_function(name: str, registry) -> Callable:
    if name == "eager" or name not in registry:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return registry[name]


def _is_silu(act: nn.Module) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def projection(linear: nn.Module) -> Projection | None:
    """The fused path's view of one projection, or None when it cannot take this call
    (a bias, DoRA, active LoRA dropout, several active adapters, merged weights, ...)."""
    if type(linear) is nn.Linear:
        return Projection(linear.weight) if linear.bias is None else None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    if not isinstance(linear, LoraLayer):
        return None
    base = linear.get_base_layer()
    if type(base) is not nn.Linear or base.bias is not None or linear.merged:
        return None
    if linear.disable_adapters:
        return Projection(base.weight)
    active = list(linear.active_adapters)
    if len(active) != 1:
        return None
    name = active[0]
    if name not in linear.lora_A:
        return Projection(base.weight)
    dropout = linear.lora_dropout[name]
    if linear.use_dora.get(name, False) or (getattr(linear, "lora_bias", {}) or {}).get(name) \
            or (isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training):
        return None
    return Projection(base.weight, linear.lora_A[name].weight, linear.lora_B[name].weight,
                      float(linear.scaling[name]))


class FusedMLPMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [projection(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if any(p is None for p in parts) or not _is_silu(self.act_fn):
            return super().forward(x)
        return lora_mlp(x, *parts, impl="triton")
