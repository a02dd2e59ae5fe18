"""RMSNorm forward and backward (dX and dW), one row per program.

Zhang & Sennrich (2019), as Llama / Mistral / Qwen2 / Qwen3 compute it (float32 statistics):

    r = 1 / sqrt(mean(x^2) + eps),   x_hat = x r,   y = w * x_hat

Backward, with ``g = dy * w``:

    dx = r (g - x_hat mean(g x_hat)),   dw = sum over rows of dy * x_hat

Forward saves ``x`` and ``r`` (one float per row), not ``x_hat``. ``dw`` is summed per program
into a ``[programs, H]`` float32 buffer, then over programs by torch (no atomics, deterministic).
The output dtype is that of ``w * x`` in PyTorch's promotion (as the transformers module).
"""

from __future__ import annotations

import torch

from .runtime import triton_importable

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_forward(x_ptr, w_ptr, y_ptr, r_ptr, x_stride, y_stride, n_rows, H, eps,
                         BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
        """``ROWS`` rows per program (several short rows, e.g. per-head q/k norms, fill it)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, BLOCK_H)[None, :]
        mask = (rows < n_rows) & (cols < H)
        x = tl.load(x_ptr + rows * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, 1) / H + eps)
        tl.store(r_ptr + rows, r[:, None], mask=rows < n_rows)
        tl.store(y_ptr + rows * y_stride + cols, (x * r[:, None] * w).to(y_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _rmsnorm_backward(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dw_ptr, dy_stride, x_stride,
                          dx_stride, n_rows, H, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for row in range(pid, n_rows, programs):
            row64 = row
            x = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + row64)
            x_hat = x * r
            g = dy * w
            dx = r * (g - x_hat * (tl.sum(g * x_hat, 0) / H))
            tl.store(dx_ptr + row64 * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x_hat
        tl.store(dw_ptr + pid * H + cols, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _block(h: int) -> dict:
    block = triton.next_power_of_2(h)
    return {"BLOCK_H": block, "num_warps": min(16, max(1, block // 256))}


def _rows_per_program(h: int) -> int:
    """Rows per forward program: about 4096 elements per program, at most 16 rows."""
    return max(1, min(16, 4096 // triton.next_power_of_2(h)))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        n, h = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n, h), dtype=out_dtype, device=x.device)
        r = torch.empty(n, dtype=torch.float32, device=x.device)
        if n:
            rows = _rows_per_program(h)
            _rmsnorm_forward[(triton.cdiv(n, rows),)](x2, weight, y, r, x2.stride(0), y.stride(0),
                                                      n, h, eps, ROWS=rows, **_block(h))
        ctx.save_for_backward(x2, weight, r)
        ctx.shape = x.shape
        return y.reshape(*x.shape[:-1], h)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, r = ctx.saved_tensors
        n, h = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        programs = max(1, min(n, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                              if x2.is_cuda else 4))
        dw_partial = torch.empty((programs, h), dtype=torch.float32, device=x2.device)
        if n:
            _rmsnorm_backward[(programs,)](dy2, x2, weight, r, dx, dw_partial, dy2.stride(0),
                                           x2.stride(0), dx.stride(0), n, h, **_block(h))
        else:
            dw_partial.zero_()
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim, in Triton (forward and backward)."""
    return _RMSNorm.apply(x, weight, float(eps))


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The transformers formula (float32 statistics, cast back before the weight)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
