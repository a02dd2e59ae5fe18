"""Every Triton kernel against its pure-torch reference: values and gradients.

On a machine without a GPU the kernels run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) in float32, on small odd shapes (N, V, H not multiples of any block),
with ignored rows and temperatures != 1. The ``gpu`` tier repeats them in bfloat16 / float16
against a float32 oracle (the kernel no worse than the reference run in the same dtype).
Tolerances: :mod:`cuda_ft.kernels.tolerances`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from cuda_ft.kernels.runtime import triton_runs_on
from cuda_ft.kernels.tolerances import LOW_PRECISION_SLACK, tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_runs_on(DEVICE):
    pytest.skip("Triton cannot run here (not importable, or no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from cuda_ft.kernels.fused_head import (
    fused_linear_logprobs,
    reference_linear_logprobs,
)
from cuda_ft.kernels.lora_mlp import Projection, lora_mlp, reference_lora_mlp
from cuda_ft.kernels.lora_qkv import lora_qkv, reference_lora_qkv
from cuda_ft.kernels.rmsnorm import reference_rms_norm, rms_norm
from cuda_ft.kernels.rope import apply_rope, reference_rope
from cuda_ft.kernels.swiglu import reference_swiglu, swiglu

LOW = [pytest.param(d, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")]) for d in
    (torch.bfloat16, torch.float16)]


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def close(got: torch.Tensor, want: torch.Tensor, kernel: str, what: str,
          dtype: torch.dtype = torch.float32) -> None:
    """``got`` equals ``want`` within the table's tolerance, relative to want's largest value."""
    atol, rtol = tolerance(kernel, dtype)
    scale = want.detach().float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.detach().float() / scale, want.detach().float() / scale,
                               atol=atol, rtol=rtol, msg=lambda m: f"{kernel} {what}: {m}")


def grads(outputs, inputs, upstream):
    total = sum((o.float() * g).sum() for o, g in zip(outputs, upstream) if o is not None)
    return torch.autograd.grad(total, inputs)


# --- fused linear + log-softmax ------------------------------------------------------------
def head_case(n=37, h=24, v=301, trained_weight=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(DEVICE, dtype)
    weight.requires_grad_(trained_weight)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    targets[n // 3], targets[n // 2], targets[n - 1] = -100, -1, v - 1  # ignored rows, last id
    return hidden, weight, targets


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("trained_weight,temperature,chunk", [
    (False, 1.0, 8), (False, 0.7, None), (True, 1.3, 5), (True, 1.0, 64)])
def test_fused_head_matches_full_logits(impl, trained_weight, temperature, chunk):
    hidden, weight, targets = head_case(trained_weight=trained_weight)
    out = fused_linear_logprobs(hidden, weight, targets, temperature, with_entropy=True,
                                with_log_sum_sq=True, chunk_size=chunk, impl=impl)
    ref = reference_linear_logprobs(hidden, weight, targets, temperature, with_entropy=True,
                                    with_log_sum_sq=True)
    for name in ("logps", "entropy", "log_sum_sq"):
        close(getattr(out, name), getattr(ref, name), "fused_head", name)
    assert out.logps.dtype == torch.float32 and not out.log_sum_sq.requires_grad
    inputs = [hidden, weight] if trained_weight else [hidden]
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(len(targets), generator=gen).to(DEVICE) for _ in range(2)]
    got = grads(out[:2], inputs, upstream)
    want = grads(ref[:2], inputs, upstream)
    for name, g, w in zip(("d hidden", "d weight"), got, want):
        close(g, w, "fused_head", name)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_head_ignored_rows_have_zero_logp_and_no_gradient(impl):
    hidden, weight, targets = head_case(n=9, v=67, trained_weight=True)
    targets[:] = -100
    targets[4] = 5
    out = fused_linear_logprobs(hidden, weight, targets, with_entropy=True, impl=impl)
    assert torch.count_nonzero(out.logps).item() == 1 and out.logps[4] < 0
    gh, gw = torch.autograd.grad(out.logps.sum(), [hidden, weight])
    assert torch.count_nonzero(gh.abs().sum(-1)).item() == 1  # only row 4 gets a gradient
    assert gw.abs().sum() > 0
    # ignored rows still have the entropy of their distribution
    ref = reference_linear_logprobs(hidden, weight, targets, with_entropy=True)
    close(out.entropy, ref.entropy, "fused_head", "entropy of ignored rows")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_head_entropy_gradient_alone_with_a_frozen_weight(impl):
    """The frozen-weight schedule precomputes only d logp / d h; an entropy gradient must
    still arrive (by recomputation), e.g. for an entropy bonus."""
    hidden, weight, targets = head_case(n=13, v=45)
    out = fused_linear_logprobs(hidden, weight, targets, 0.9, with_entropy=True, chunk_size=4,
                                impl=impl)
    ref = reference_linear_logprobs(hidden, weight, targets, 0.9, with_entropy=True)
    (got,) = torch.autograd.grad(out.entropy.sum(), [hidden])
    (want,) = torch.autograd.grad(ref.entropy.sum(), [hidden])
    assert want.abs().max() > 1e-3
    close(got, want, "fused_head", "d entropy / d hidden")


def test_fused_head_rejects_bad_input():
    hidden, weight, targets = head_case(n=5, v=11)
    targets[0] = 11
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_logprobs(hidden, weight, targets)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, targets.clamp(max=3), 0.0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        fused_linear_logprobs(hidden, weight, targets[:3])


def test_fused_head_no_grad_and_empty():
    hidden, weight, targets = head_case(n=6, v=20)
    with torch.no_grad():
        out = fused_linear_logprobs(hidden, weight, targets, impl="triton")
    assert not out.logps.requires_grad
    empty = fused_linear_logprobs(hidden[:0], weight, targets[:0], with_entropy=True)
    assert empty.logps.shape == (0,) and empty.entropy.shape == (0,)


# --- RMSNorm, RoPE, SwiGLU, LoRA MLP ---------------------------------------------------------
def _rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("shape", [(3, 7, 37), (5, 64)])
def test_rmsnorm_values_dx_dw(shape):
    x, w = _rand(*shape), _rand(shape[-1], seed=1)
    got, want = rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6)
    close(got, want, "rmsnorm", "y")
    dy = torch.randn_like(want)
    for name, g, r in zip(("dx", "dw"), torch.autograd.grad(got, (x, w), dy),
                          torch.autograd.grad(want, (x, w), dy)):
        close(g, r, "rmsnorm", name)


def _cos_sin(positions: torch.Tensor, dim: int):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], -1).to(DEVICE)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("heads,kv_heads,batch_cos", [(6, 2, 2), (3, 3, 1)])
def test_rope_q_and_k_with_position_ids(heads, kv_heads, batch_cos):
    b, t, d = 2, 5, 12
    q_proj, k_proj = _rand(b, t, heads * d), _rand(b, t, kv_heads * d, seed=1)
    q = q_proj.view(b, t, heads, d).transpose(1, 2)  # strided, as transformers hands it
    k = k_proj.view(b, t, kv_heads, d).transpose(1, 2)
    # packed rows: positions restart at each document
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])[:batch_cos]
    cos, sin = _cos_sin(positions, d)
    got, want = apply_rope(q, k, cos, sin), reference_rope(q, k, cos, sin)
    close(got[0], want[0], "rope", "q")
    close(got[1], want[1], "rope", "k")
    up = [torch.randn_like(want[0]), torch.randn_like(want[1])]
    for name, g, r in zip(("dq", "dk"), grads(got, (q_proj, k_proj), up),
                          grads(want, (q_proj, k_proj), up)):
        close(g, r, "rope", name)


def test_swiglu_values_and_gradients():
    g, u = _rand(5, 33), _rand(5, 33, seed=1)
    got, want = swiglu(g, u), reference_swiglu(g, u)
    close(got, want, "swiglu", "h")
    dh = torch.randn_like(want)
    for name, a, b in zip(("dg", "du"), torch.autograd.grad(got, (g, u), dh),
                          torch.autograd.grad(want, (g, u), dh)):
        close(a, b, "swiglu", name)


def _projection(out, inp, seed, lora=True, trained=False, dtype=torch.float32):
    w = _rand(out, inp, seed=seed, scale=0.2, dtype=dtype).requires_grad_(trained)
    if not lora:
        return Projection(w)
    return Projection(w, _rand(3, inp, seed=seed + 1, scale=0.3), _rand(out, 3, seed=seed + 2,
                                                                           scale=0.3), 2.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("trained_base", [False, True])
def test_lora_mlp_values_dx_dlora_dw(impl, trained_base):
    hidden, inter = 20, 37
    gate = _projection(inter, hidden, 10, trained=trained_base)
    up = _projection(inter, hidden, 20, lora=not trained_base, trained=trained_base)
    down = _projection(hidden, inter, 30, trained=trained_base)
    x = _rand(2, 11, hidden)
    got, want = lora_mlp(x, gate, up, down, impl=impl), reference_lora_mlp(x, gate, up, down)
    close(got, want, "lora_mlp", "y")
    params = [x] + [t for p in (gate, up, down) for t in p[:3] if t is not None and
                    t.requires_grad]
    dy = torch.randn_like(want)
    names = ["dx"] + [f"d{i}" for i in range(1, len(params))]
    for name, g, r in zip(names, torch.autograd.grad(got, params, dy),
                          torch.autograd.grad(want, params, dy)):
        close(g, r, "lora_mlp", name)


@pytest.mark.parametrize("trained_base", [False, True])
def test_lora_qkv_values_dx_dlora_dw(trained_base):
    hidden = 20
    q = _projection(24, hidden, 40, trained=trained_base)
    k = _projection(12, hidden, 50, lora=False, trained=trained_base)  # an unadapted one
    v = _projection(12, hidden, 60, trained=trained_base)
    x = _rand(2, 7, hidden)
    got, want = lora_qkv(x, q, k, v), reference_lora_qkv(x, q, k, v)
    for name, g, w in zip("qkv", got, want):
        close(g, w, "lora_qkv", name)
    params = [x] + [t for p in (q, k, v) for t in p[:3] if t is not None and t.requires_grad]
    up = [torch.randn_like(w) for w in want]
    for i, (g, r) in enumerate(zip(grads(got, params, up), grads(want, params, up))):
        close(g, r, "lora_qkv", f"grad {i}")


# --- low precision on a GPU: no worse than the reference in the same dtype -----------------
def no_worse(got, ref_low, oracle, kernel, what, dtype):
    err = (got.float() - oracle.float()).abs().max().item()
    ref_err = (ref_low.float() - oracle.float()).abs().max().item()
    atol, _ = tolerance(kernel, dtype)
    scale = max(1.0, oracle.float().abs().max().item())
    assert err <= max(LOW_PRECISION_SLACK * ref_err, atol * scale), \
        f"{kernel} {what} {dtype}: error {err:.3g} vs reference's {ref_err:.3g}"


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("trained_weight", [False, True])
def test_fused_head_low_precision(dtype, trained_weight):
    hidden, weight, targets = head_case(n=1000, h=256, v=5003, trained_weight=trained_weight,
                                        dtype=dtype)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_(trained_weight)
    out = fused_linear_logprobs(hidden, weight, targets, 0.8, with_entropy=True, impl="triton")
    ref = reference_linear_logprobs(hidden, weight, targets, 0.8, with_entropy=True)
    oracle = reference_linear_logprobs(h32, w32, targets, 0.8, with_entropy=True)
    no_worse(out.logps, ref.logps, oracle.logps, "fused_head", "logps", dtype)
    no_worse(out.entropy, ref.entropy, oracle.entropy, "fused_head", "entropy", dtype)
    up = [torch.randn(len(targets), device=DEVICE) for _ in range(2)]
    ins = [hidden, weight] if trained_weight else [hidden]
    ins32 = [h32, w32] if trained_weight else [h32]
    for g, r, o in zip(grads(out[:2], ins, up), grads(ref[:2], ins, up),
                       grads(oracle[:2], ins32, up)):
        no_worse(g, r, o, "fused_head", "grad", dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_block_kernels_low_precision(dtype):
    x = _rand(64, 576, dtype=dtype)
    w = _rand(576, seed=1, dtype=dtype)
    x32, w32 = x.detach().float(), w.detach().float()
    no_worse(rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5),
             reference_rms_norm(x32, w32, 1e-5), "rmsnorm", "y", dtype)
    g, u = _rand(64, 1536, dtype=dtype), _rand(64, 1536, seed=2, dtype=dtype)
    no_worse(swiglu(g, u), reference_swiglu(g, u),
             reference_swiglu(g.detach().float(), u.detach().float()), "swiglu", "h", dtype)
    q, k = _rand(2, 9, 128, 64, dtype=dtype), _rand(2, 3, 128, 64, seed=3, dtype=dtype)
    cos, sin = _cos_sin(torch.arange(128)[None].expand(2, -1), 64)
    got = apply_rope(q, k, cos.to(dtype), sin.to(dtype))
    ref = reference_rope(q, k, cos.to(dtype), sin.to(dtype))
    oracle = reference_rope(q.detach().float(), k.detach().float(), cos, sin)
    for i in range(2):
        no_worse(got[i], ref[i], oracle[i], "rope", "qk", dtype)
