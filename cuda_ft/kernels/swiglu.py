"""SwiGLU (Shazeer, 2020) forward and backward with recompute.

    h = silu(g) * u = g sigmoid(g) u

Backward recomputes ``sigmoid(g)`` instead of saving ``silu(g)``; with ``s = sigmoid(g)``:

    du = dh silu(g),   dg = dh u s (1 + g (1 - s))

Saved for backward: ``g`` and ``u`` only. :func:`swiglu_backward` can also hand back the
recomputed ``h`` (the fused LoRA MLP needs it for the down projection's gradients).
"""

from __future__ import annotations

import torch

from .runtime import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n, WRITE_H: tl.constexpr,
                         BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty),
                 mask=mask)
        if WRITE_H:
            tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, is_cuda: bool) -> tuple[tuple[int], dict]:
    block = 1024 if is_cuda else 256
    return (triton.cdiv(n, block),), {"BLOCK": block}


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (no autograd), in the promoted dtype of ``g`` and ``u``."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    if g.numel():
        grid, meta = _grid(g.numel(), g.is_cuda)
        _swiglu_forward[grid](g, u, h, g.numel(), **meta)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, want_h: bool = False):
    """``(dg, du, h or None)`` for upstream ``dh`` (``h`` recomputed when ``want_h``)."""
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device) \
        if want_h else None
    if g.numel():
        grid, meta = _grid(g.numel(), g.is_cuda)
        _swiglu_backward[grid](dh, g, u, dg, du, h if want_h else dg, g.numel(),
                               WRITE_H=want_h, **meta)
    return dg, du, h


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dg, du, _ = swiglu_backward(dh, g, u)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` with a recomputing backward (Triton)."""
    if g.shape != u.shape:
        raise ValueError(f"swiglu: gate {tuple(g.shape)} and up {tuple(u.shape)} differ")
    return _SwiGLU.apply(g, u)


def reference_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(g) * u
