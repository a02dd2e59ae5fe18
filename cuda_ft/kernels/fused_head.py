"""Fused linear + selective log-softmax: log-probs of the target tokens (and, from the same
pass, entropy and log sum p^2) without the ``[N, V]`` logits ever existing in full.

For hidden states ``h [N, H]``, head weight ``W [V, H]``, temperature ``T`` and targets ``t``:

    z = h W^T / T                              (one chunk of rows at a time: [C, V])
    lse = logsumexp(z),  log p_t = z_t - lse   (0 where t < 0: an ignored row)
    entropy = lse - sum_v p_v z_v              (E_p[z] = sum_v p_v z_v)
    log sum_v p_v^2 = logsumexp(2 z) - 2 lse   (WPO's normaliser; no gradient)

Per row, one online pass over the vocabulary (a running max and rescaled sums, as in
Milakov & Gimelshein's online softmax) gives all of them; a second pass writes the gradient of
the upstream scalars into the chunk's logits buffer in place:

    d/dz_v [g_lp log p_t + g_ent H] = g_lp (1[v = t] - p_v) - g_ent p_v (z_v - E_p[z])

and ``dL/dh = G W / T``, ``dL/dW = G^T h / T`` are two matmuls on that buffer. The matmuls are
cuBLAS's; the row passes are a Triton kernel (``impl="triton"``) or the same arithmetic in torch
(``impl="torch"``, any device). Two schedules, chosen per call:

- frozen ``W`` (LoRA, DoRA): the log-prob gradient ``G W / T`` is formed in the forward pass
  while the chunk's logits are at hand; backward only scales the saved ``[N, H]`` by ``g_lp``
  (2 matmuls in all, no recompute). An entropy gradient, if one arrives, is recomputed.
- trainable ``W`` (full fine-tuning, tied embeddings): forward keeps only ``lse`` and
  ``E_p[z]`` per row; backward recomputes each chunk's logits (4 matmuls in all), which is what
  keeps memory at one ``[C, V]`` chunk whatever the upstream gradient is.

Ignored rows (target < 0, e.g. -100): log-prob 0 and no gradient through it; their entropy and
log sum p^2 are still those of the row's distribution (they do not depend on the target).
A target >= V is an error. ``reference_linear_logprobs`` is the plain full-logits formula.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .runtime import triton_importable, triton_runs_on, why_not

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _head_rows_forward(logits_ptr, stride, targets_ptr, lse_ptr, logp_ptr, ez_ptr, ent_ptr,
                           lss_ptr, n_rows, V, inv_t, WITH_ENT: tl.constexpr,
                           WITH_LSS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        """``ROWS`` rows: online max / sum exp (and sum e z, sum e^2) over V, then the
        statistics. One row per program on a GPU; several under the interpreter."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        in_range = rows < n_rows
        base = logits_ptr + rows[:, None] * stride
        m = tl.full([ROWS], float("-inf"), tl.float32)
        s = tl.zeros([ROWS], dtype=tl.float32)
        sz = tl.zeros([ROWS], dtype=tl.float32)
        s2 = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)[None, :]
            z = tl.load(base + cols, mask=in_range[:, None] & (cols < V), other=float("-inf"))
            z = tl.where(in_range[:, None], z.to(tl.float32) * inv_t, 0.0)
            m_new = tl.maximum(m, tl.max(z, 1))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * scale + tl.sum(e, 1)
            if WITH_ENT:
                sz = sz * scale + tl.sum(e * tl.where(e > 0.0, z, 0.0), 1)
            if WITH_LSS:
                s2 = s2 * scale * scale + tl.sum(e * e, 1)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(targets_ptr + rows, mask=in_range, other=-1)
        valid = (target >= 0) & (target < V)
        z_t = tl.load(logits_ptr + rows * stride + tl.where(valid, target, 0), mask=in_range,
                      other=0.0).to(tl.float32) * inv_t
        tl.store(lse_ptr + rows, lse, mask=in_range)
        tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, 0.0), mask=in_range)
        if WITH_ENT:
            ez = sz / s
            tl.store(ez_ptr + rows, ez, mask=in_range)
            tl.store(ent_ptr + rows, lse - ez, mask=in_range)
        if WITH_LSS:
            tl.store(lss_ptr + rows, tl.log(s2) + 2.0 * m - 2.0 * lse, mask=in_range)

    @triton.jit
    def _head_rows_grad(logits_ptr, stride, targets_ptr, lse_ptr, ez_ptr, g_lp_ptr, g_ent_ptr,
                        n_rows, V, inv_t, HAS_LP: tl.constexpr, HAS_ENT: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        """``ROWS`` rows: overwrite the logits with dL/dz / T (see the module docstring)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        in_range = rows < n_rows
        base = logits_ptr + rows[:, None] * stride
        lse = tl.load(lse_ptr + rows, mask=in_range, other=0.0)[:, None]
        target = tl.load(targets_ptr + rows, mask=in_range, other=-1)[:, None]
        g_lp = tl.zeros([ROWS, 1], dtype=tl.float32)
        if HAS_LP:
            g_lp = tl.load(g_lp_ptr + rows, mask=in_range, other=0.0)[:, None]
            g_lp = tl.where((target >= 0) & (target < V), g_lp, 0.0)
        g_ent = tl.zeros([ROWS, 1], dtype=tl.float32)
        ez = tl.zeros([ROWS, 1], dtype=tl.float32)
        if HAS_ENT:
            g_ent = tl.load(g_ent_ptr + rows, mask=in_range, other=0.0)[:, None]
            ez = tl.load(ez_ptr + rows, mask=in_range, other=0.0)[:, None]
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)[None, :]
            mask = in_range[:, None] & (cols < V)
            z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(z - lse)
            g = tl.zeros([ROWS, BLOCK_V], dtype=tl.float32)
            if HAS_LP:
                g += g_lp * (tl.where(cols == target, 1.0, 0.0) - p)
            if HAS_ENT:
                g -= g_ent * p * (tl.where(p > 0.0, z, 0.0) - ez)
            tl.store(base + cols, (g * inv_t).to(logits_ptr.dtype.element_ty), mask=mask)


class HeadOutputs(NamedTuple):
    """float32 ``[N]`` each; ``entropy`` / ``log_sum_sq`` are None unless asked for."""

    logps: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq: torch.Tensor | None


class _RowStats(NamedTuple):
    lse: torch.Tensor
    logp: torch.Tensor
    ez: torch.Tensor | None
    entropy: torch.Tensor | None
    lss: torch.Tensor | None


def _launch(logits: torch.Tensor) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters: one row per program over wide vocabulary blocks on a GPU;
    several rows and small blocks under the interpreter (fewer, cheaper programs there, and
    the tests' odd vocabularies still take several blocks)."""
    c, v = logits.shape
    if logits.is_cuda:
        return (c,), {"ROWS": 1, "BLOCK_V": min(triton.next_power_of_2(v), 4096),
                      "num_warps": 8}
    return (triton.cdiv(c, 16),), {"ROWS": 16, "BLOCK_V": min(triton.next_power_of_2(v), 64)}


def _rows_forward(logits: torch.Tensor, targets: torch.Tensor, inv_t: float, with_ent: bool,
                  with_lss: bool, impl: str) -> _RowStats:
    """Row statistics of one chunk of logits ``[C, V]`` (any dtype) -> float32 ``[C]`` each."""
    c, v = logits.shape
    if impl == "torch":
        z = logits if logits.dtype == torch.float32 and inv_t == 1.0 else logits.float() * inv_t
        lse = torch.logsumexp(z, -1)
        valid = (targets >= 0) & (targets < v)
        z_t = z.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0]
        logp = torch.where(valid, z_t - lse, 0.0)
        ez = ent = lss = None
        if with_ent:
            p = torch.exp(z - lse[:, None])
            ez = torch.where(p > 0, p * z, 0.0).sum(-1)
            ent = lse - ez
        if with_lss:
            lss = torch.logsumexp(2 * z, -1) - 2 * lse
        return _RowStats(lse, logp, ez, ent, lss)
    out = [torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(5)]
    grid, meta = _launch(logits)
    _head_rows_forward[grid](logits, logits.stride(0), targets, *out, c, v, inv_t,
                             WITH_ENT=with_ent, WITH_LSS=with_lss, **meta)
    lse, logp, ez, ent, lss = out
    return _RowStats(lse, logp, ez if with_ent else None, ent if with_ent else None,
                     lss if with_lss else None)


def _rows_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                ez: torch.Tensor | None, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None,
                inv_t: float, impl: str) -> torch.Tensor:
    """Overwrite ``logits [C, V]`` with ``dL/dz / T`` for upstream ``g_lp`` / ``g_ent`` [C]."""
    c, v = logits.shape
    if impl == "torch":
        z = logits.float() * inv_t
        p = torch.exp(z - lse[:, None])
        g = torch.zeros_like(z)
        if g_lp is not None:
            valid = (targets >= 0) & (targets < v)
            g_row = torch.where(valid, g_lp.float(), 0.0)
            g = -g_row[:, None] * p
            g.scatter_add_(-1, torch.where(valid, targets, 0)[:, None], g_row[:, None])
        if g_ent is not None:
            g -= g_ent.float()[:, None] * torch.where(p > 0, p * (z - ez[:, None]), 0.0)
        return logits.copy_(g * inv_t)
    dummy = lse
    grid, meta = _launch(logits)
    _head_rows_grad[grid](logits, logits.stride(0), targets, lse,
                          ez if ez is not None else dummy,
                          g_lp.float().contiguous() if g_lp is not None else dummy,
                          g_ent.float().contiguous() if g_ent is not None else dummy,
                          c, v, inv_t, HAS_LP=g_lp is not None, HAS_ENT=g_ent is not None,
                          **meta)
    return logits


def _eager_grad(logits: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                lse: torch.Tensor, inv_t: float, impl: str, ones: torch.Tensor) -> torch.Tensor:
    """``d log p_t / d h = (W_t - softmax(z) W) / T`` for one chunk (0 for ignored rows),
    overwriting ``logits``. The torch twin forms ``p`` in place and gathers ``W_t`` instead of
    writing the one-hot term into ``[C, V]`` (two passes over the chunk fewer)."""
    if impl == "triton":
        return _rows_grad_(logits, targets, lse, None, ones[:logits.shape[0]], None, inv_t,
                           impl) @ w
    probs = logits.float() if logits.dtype != torch.float32 else logits
    if inv_t != 1.0:
        probs.mul_(inv_t)
    probs = probs.sub_(lse[:, None]).exp_().to(w.dtype)
    valid = (targets >= 0) & (targets < w.shape[0])
    grad = w[torch.where(valid, targets, 0)] - probs @ w
    grad.mul_((valid.to(grad.dtype) * inv_t)[:, None])
    return grad


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as ``nn.Linear`` would), else the promoted one."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunks(n: int, chunk: int):
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_ent, with_lss, chunk, impl):
        ctx.set_materialize_grads(False)
        cdt = _compute_dtype(hidden, weight)
        h, w = hidden.to(cdt), weight.to(cdt)
        inv_t = 1.0 / temperature
        n = h.shape[0]
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        f32 = {"dtype": torch.float32, "device": h.device}
        logps, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        ez, ent = (torch.empty(n, **f32), torch.empty(n, **f32)) if with_ent else (None, None)
        lss = torch.empty(n, **f32) if with_lss else None
        grad_h_lp = torch.empty_like(h) if eager else None
        ones = torch.ones(min(chunk, n), **f32) if eager else None
        for rows in _chunks(n, chunk):
            logits = h[rows] @ w.t()
            stats = _rows_forward(logits, targets[rows], inv_t, with_ent, with_lss, impl)
            logps[rows], lse[rows] = stats.logp, stats.lse
            if with_ent:
                ez[rows], ent[rows] = stats.ez, stats.entropy
            if with_lss:
                lss[rows] = stats.lss
            if eager:  # d log p / d h while the chunk's logits are here (frozen W)
                grad_h_lp[rows] = _eager_grad(logits, w, targets[rows], stats.lse, inv_t, impl,
                                              ones)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, ez, grad_h_lp)
        ctx.cfg = (cdt, inv_t, chunk, impl, eager)
        empty = torch.empty(0, **f32)
        ent, lss = (ent if with_ent else empty), (lss if with_lss else empty)
        ctx.mark_non_differentiable(lss)
        if not with_ent:
            ctx.mark_non_differentiable(ent)
        return logps, ent, lss

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lss):
        hidden, weight, targets, lse, ez, grad_h_lp = ctx.saved_tensors
        cdt, inv_t, chunk, impl, eager = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = grad_w = None
        if eager and g_lp is not None:
            grad_h = (g_lp[:, None] * grad_h_lp.float())
            g_lp = None  # done
        if g_ent is not None and ez is None:
            g_ent = None
        if g_lp is not None or g_ent is not None:
            h, w = hidden.to(cdt), weight.to(cdt)
            if need_h and grad_h is None:
                grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            if need_w:
                grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for rows in _chunks(h.shape[0], chunk):
                logits = h[rows] @ w.t()
                g = _rows_grad_(logits, targets[rows], lse[rows],
                                None if ez is None else ez[rows],
                                None if g_lp is None else g_lp[rows],
                                None if g_ent is None else g_ent[rows], inv_t, impl)
                if need_h:
                    grad_h[rows] += (g @ w).float()
                if need_w:
                    grad_w += (g.t() @ h[rows]).float()
                del logits, g
        return (None if grad_h is None or not need_h else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None, None, None, None, None, None)


def default_chunk_size(n: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: the largest power of two whose ``[C, V]`` logits chunk stays within
    2^27 elements on a GPU (256 MB in bf16; big enough that the matmuls, not the launches,
    set the pace) or 2^24 on the CPU (64 MB in fp32), at least 1 and at most N."""
    budget = 1 << (27 if device.type == "cuda" else 24)
    rows = max(1, budget // max(1, vocab))
    return max(1, min(n, 1 << (rows.bit_length() - 1)))


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` where Triton runs on ``device``, else ``torch``; an explicit
    ``triton`` that cannot run raises ValueError saying why."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r}: must be auto, triton or torch")
    if impl == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(why_not(device))
    return impl


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, *, with_entropy: bool = False,
                          with_log_sum_sq: bool = False, chunk_size: int | None = None,
                          impl: str = "auto") -> HeadOutputs:
    """``log softmax(h W^T / T)[t]`` per row (+ entropy, + log sum p^2), chunked over rows.

    ``hidden [N, H]``, ``weight [V, H]`` (any float dtypes; the matmuls run in autocast's dtype
    when it is on), ``targets [N]`` integer ids (< 0 ignored). Differentiable w.r.t. ``hidden``
    and ``weight`` through ``logps`` and ``entropy``; ``log_sum_sq`` carries no gradient.
    ``chunk_size`` rows per chunk (None: :func:`default_chunk_size`); ``impl`` auto / triton /
    torch (see :func:`resolve_impl`). Returns float32 :class:`HeadOutputs`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long().contiguous()
    if n and int(targets.max()) >= vocab:
        raise ValueError(f"target id {int(targets.max())} is outside the vocabulary (V={vocab})")
    chunk = chunk_size or default_chunk_size(n, vocab, hidden.device)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if n == 0:
        zero = hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
        return HeadOutputs(zero, zero if with_entropy else None, zero if with_log_sum_sq else None)
    impl = resolve_impl(impl, hidden.device)
    logps, ent, lss = _FusedLinearLogprobs.apply(hidden, weight, targets, float(temperature),
                                                 with_entropy, with_log_sum_sq, chunk, impl)
    return HeadOutputs(logps, ent if with_entropy else None, lss if with_log_sum_sq else None)


def reference_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, *, with_entropy: bool = False,
                              with_log_sum_sq: bool = False) -> HeadOutputs:
    """The same outputs from the full float32 ``[N, V]`` logits and autograd (the oracle)."""
    z = (hidden.float() @ weight.float().t()) / temperature
    logp_all = z.log_softmax(-1)
    valid = targets >= 0
    picked = logp_all.gather(-1, torch.where(valid, targets, 0).long()[:, None])[:, 0]
    logps = torch.where(valid, picked, 0.0)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    lss = torch.logsumexp(2 * logp_all, -1).detach() if with_log_sum_sq else None
    return HeadOutputs(logps, entropy, lss)
