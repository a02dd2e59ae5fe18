"""A (LoRA-)SwiGLU MLP as ONE autograd node with a hand-derived backward.

Each projection is ``P(x) = x W^T + s (x A^T) B^T`` (LoRA: ``A [r, in]``, ``B [out, r]``,
``s = alpha / r``; without an adapter just ``x W^T``), and the block is

    g = P_gate(x),  u = P_up(x),  h = silu(g) * u,  y = P_down(h)

Backward, for one projection with upstream ``dy`` and input ``x`` (``xa = x A^T`` saved,
``[N, r]``):

    dx = dy W + s (dy B) A,   dA = s (dy B)^T x,   dB = s dy^T xa,   dW = dy^T x (if trained)

Saved: ``x``, ``g``, ``u`` and the three ``[N, r]`` products; ``h`` and ``silu(g)`` are
recomputed in the SwiGLU backward kernel (:mod:`.swiglu`), which hands ``h`` back for the down
projection's ``dA`` / ``dW``. Autograd over the unfused modules keeps ``g``, ``u``, ``silu(g)``
and ``h`` (two ``[N, I]`` tensors more per block) and runs each LoRA branch as separate nodes.
Dropout on the LoRA input and DoRA are not covered (the caller falls back to the modules).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .swiglu import swiglu_backward, swiglu_forward


class Projection(NamedTuple):
    """One linear layer of the block: base ``weight [out, in]``, optional LoRA ``a``/``b``."""

    weight: torch.Tensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0


def _forward(x: torch.Tensor, w, a, b, scale: float, cdt: torch.dtype):
    y = x @ w.to(cdt).t()
    if a is None:
        return y, None
    xa = x @ a.to(cdt).t()
    return y.addmm_(xa, b.to(cdt).t(), alpha=scale), xa


def _backward(dy, x, xa, w, a, b, scale, cdt, needs):
    """(dx, dW, dA, dB) for one projection; ``needs`` = (x, W, A, B) requires-grad flags."""
    dx = dy @ w.to(cdt) if needs[0] else None
    dw = (dy.t() @ x).to(w.dtype) if needs[1] else None
    da = db = None
    if a is not None:
        dyb = dy @ b.to(cdt)
        if dx is not None:
            dx.addmm_(dyb, a.to(cdt), alpha=scale)
        if needs[2]:
            da = ((dyb.t() @ x) * scale).to(a.dtype)
        if needs[3]:
            db = ((dy.t() @ xa) * scale).to(b.dtype)
    return dx, dw, da, db


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, scales, impl):
        kind = x.device.type
        cdt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        g, xag = _forward(x2, wg, ag, bg, scales[0], cdt)
        u, xau = _forward(x2, wu, au, bu, scales[1], cdt)
        h = swiglu_forward(g, u) if impl == "triton" else F.silu(g) * u
        y, had = _forward(h, wd, ad, bd, scales[2], cdt)
        del h
        ctx.save_for_backward(x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd)
        ctx.cfg = (scales, impl, cdt, x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xag, xau, had, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        scales, impl, cdt, shape, dtype = ctx.cfg
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
        down_needs = (True, need[7], need[8], need[9])
        want_h = need[7] or need[8]
        dh, dwd, dad, dbd = _backward(dy2, None, had, wd, ad, bd, scales[2], cdt,
                                      (True, False, False, need[9]))
        if impl == "triton":
            dg, du, h = swiglu_backward(dh, g, u, want_h=want_h)
        else:
            with torch.enable_grad():
                g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
                h_ = F.silu(g_) * u_
                dg, du = torch.autograd.grad(h_, (g_, u_), dh)
            h = h_.detach() if want_h else None
        if want_h:  # the down projection's dW / dA need its input h (recomputed above)
            _, dwd, dad, _ = _backward(dy2, h, had, wd, ad, bd, scales[2], cdt,
                                       (False, *down_needs[1:3], False))
        del h
        dx_g, dwg, dag, dbg = _backward(dg, x2, xag, wg, ag, bg, scales[0], cdt,
                                        (need[0], need[1], need[2], need[3]))
        dx_u, dwu, dau, dbu = _backward(du, x2, xau, wu, au, bu, scales[1], cdt,
                                        (need[0], need[4], need[5], need[6]))
        dx = (dx_g + dx_u).reshape(shape).to(dtype) if need[0] else None
        return dx, dwg, dag, dbg, dwu, dau, dbu, dwd, dad, dbd, None, None


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
             impl: str = "triton") -> torch.Tensor:
    """``P_down(silu(P_gate(x)) * P_up(x))`` in one autograd node (``impl`` triton | torch
    for the SwiGLU part; the matmuls are torch's either way)."""
    return _LoRAMLP.apply(x, *gate[:3], *up[:3], *down[:3],
                          (gate.scale, up.scale, down.scale), impl)


def reference_lora_mlp(x: torch.Tensor, gate: Projection, up: Projection,
                       down: Projection) -> torch.Tensor:
    """The same block through plain autograd, in float32."""

    def proj(v: torch.Tensor, p: Projection) -> torch.Tensor:
        y = v.float() @ p.weight.float().t()
        if p.lora_a is not None:
            y = y + p.scale * (v.float() @ p.lora_a.float().t()) @ p.lora_b.float().t()
        return y

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
