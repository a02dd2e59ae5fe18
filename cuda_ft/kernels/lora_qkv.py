"""The q / k / v projections of one attention block, with their LoRA adapters, as ONE
autograd node with a hand-derived backward.

The three projections read the same ``x``: ``P_i(x) = x W_i^T + s_i (x A_i^T) B_i^T`` for
``i`` in q, k, v (:class:`.lora_mlp.Projection`). Forward runs the three LoRA-A products as one
``[N, H] x [H, r_q + r_k + r_v]`` matmul; backward forms

    dx = sum_i dy_i W_i + s_i (dy_i B_i) A_i,   dA_i = s_i (dy_i B_i)^T x,   dB_i = s_i dy_i^T xa_i

accumulating ``dx`` in place, where autograd over PEFT's modules runs nine linear nodes (three
base, three A, three B), three dropout identities and two additions. Saved: ``x`` and the
``[N, r]`` products. The matmuls are cuBLAS's; there is no Triton code here (the gain, if any,
is fewer nodes and launches: ``scripts/bench_kernels.py`` measures it on a GPU).
"""

from __future__ import annotations

import torch

from .lora_mlp import Projection, _backward, _forward


class _LoRAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, aq, bq, wk, ak, bk, wv, av, bv, scales):
        kind = x.device.type
        cdt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        adapters = [a for a in (aq, ak, av) if a is not None]
        xa_all = x2 @ torch.cat([a.to(cdt) for a in adapters]).t() if adapters else None
        outs, xas, at = [], [], 0
        for w, a, b, s in ((wq, aq, bq, scales[0]), (wk, ak, bk, scales[1]),
                           (wv, av, bv, scales[2])):
            y, _ = _forward(x2, w, None, None, 1.0, cdt)
            xa = None
            if a is not None:
                xa = xa_all[:, at:at + a.shape[0]]
                at += a.shape[0]
                y.addmm_(xa, b.to(cdt).t(), alpha=s)
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.save_for_backward(x2, wq, aq, bq, wk, ak, bk, wv, av, bv, *xas)
        ctx.cfg = (scales, cdt, x.shape, x.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, wq, aq, bq, wk, ak, bk, wv, av, bv, xaq, xak, xav = ctx.saved_tensors
        scales, cdt, shape, dtype = ctx.cfg
        need = ctx.needs_input_grad
        dx, grads = None, []
        for i, (dy, w, a, b, xa) in enumerate(((dq, wq, aq, bq, xaq), (dk, wk, ak, bk, xak),
                                               (dv, wv, av, bv, xav))):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
            part, dw, da, db = _backward(dy2, x2, xa, w, a, b, scales[i], cdt,
                                         (need[0], *need[1 + 3 * i:4 + 3 * i]))
            if part is not None:
                dx = part if dx is None else dx.add_(part)
            grads += [dw, da, db]
        return (dx.reshape(shape).to(dtype) if dx is not None else None, *grads, None)


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection,
             v: Projection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P_q(x), P_k(x), P_v(x))`` in one autograd node."""
    return _LoRAQKV.apply(x, *q[:3], *k[:3], *v[:3], (q.scale, k.scale, v.scale))


def reference_lora_qkv(x: torch.Tensor, q: Projection, k: Projection,
                       v: Projection) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same three projections through plain autograd, in float32."""

    def proj(p: Projection) -> torch.Tensor:
        y = x.float() @ p.weight.float().t()
        if p.lora_a is not None:
            y = y + p.scale * (x.float() @ p.lora_a.float().t()) @ p.lora_b.float().t()
        return y

    return proj(q), proj(k), proj(v)
