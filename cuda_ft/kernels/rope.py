"""Rotary position embedding (Su et al., RoFormer) on Q and K in one kernel.

With the head dim split into halves ``x = [x1, x2]`` and the per-token ``cos, sin [B, T, D]``
that transformers' rotary embedding builds from ``position_ids`` (so rope scaling, and the
per-document positions of padding-free / packed rows, come in with them):

    y1 = x1 cos1 - x2 sin1,   y2 = x2 cos2 + x1 sin2          (x * cos + rotate_half(x) * sin)

Backward is the transposed rotation: ``dx1 = dy1 cos1 + dy2 sin2``, ``dx2 = dy2 cos2 - dy1 sin1``.
One program rotates every query and key head of a block of tokens; ``q`` and
``k`` may be any strided ``[B, heads, T, D]`` views with a contiguous last dim (transformers
hands ``q_proj(x).view(B, T, heads, D).transpose(1, 2)``); outputs keep the input's strides.
Nothing is saved for backward but ``cos`` and ``sin``.
"""

from __future__ import annotations

import torch

from .runtime import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(src, dst, s_b, s_h, s_t, d_b, d_h, d_t, b, t, mask, n_heads, c1, c2, s1, s2,
                HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Rotate every head of a ``[BLOCK_T, half]`` tile of tokens."""
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        for h in range(n_heads):
            src_at = src + b * s_b + t * s_t + h * s_h + cols
            x1 = tl.load(src_at, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src_at + HALF, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            dst_at = dst + b * d_b + t * d_t + h * d_h + cols
            tl.store(dst_at, y1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst_at + HALF, y2.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q, k, qo, ko, cos, sin, n_tokens, T, n_q, n_k,
                     q_b, q_h, q_t, k_b, k_h, k_t, qo_b, qo_h, qo_t, ko_b, ko_h, ko_t,
                     c_b, c_t, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
        """``BLOCK_T`` tokens per program, every query and key head of each."""
        token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        b = token // T
        t = token % T
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (token < n_tokens) & (cols < HALF)
        at = b * c_b + t * c_t + cols
        c1 = tl.load(cos + at, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos + at + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin + at, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin + at + HALF, mask=mask, other=0.0).to(tl.float32)
        _rotate(q, qo, q_b, q_h, q_t, qo_b, qo_h, qo_t, b, t, mask, n_q, c1, c2, s1, s2,
                HALF, BACKWARD, BLOCK_HALF)
        _rotate(k, ko, k_b, k_h, k_t, ko_b, ko_h, ko_t, b, t, mask, n_k, c1, c2, s1, s2,
                HALF, BACKWARD, BLOCK_HALF)


def _apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    bsz, n_q, t, d = q.shape
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    c_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = d // 2
    if bsz * t:
        block_t = 16 if q.is_cuda else 32
        _rope_kernel[(triton.cdiv(bsz * t, block_t),)](
            q, k, qo, ko, cos, sin, bsz * t, t, n_q, k.shape[1],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            c_b, cos.stride(1), HALF=half, BLOCK_T=block_t,
            BLOCK_HALF=triton.next_power_of_2(half), BACKWARD=backward)
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _apply(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _apply(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [B, Hq, T, D]`` and ``k [B, Hk, T, D]`` by ``cos, sin [B or 1, T, D]``."""
    if q.shape[-1] % 2 or q.shape[-1] != cos.shape[-1] or q.shape[2] != cos.shape[1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and cos {tuple(cos.shape)} do not fit "
                         "([B, heads, T, D] with D even, cos [B, T, D])")
    return _Rope.apply(q, k, cos, sin)


def reference_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (x * cos + rotate_half(x) * sin)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
