"""One representative config per preference algorithm: the same loss on NumpyOps, MLXOps and
TorchOps (fp32, 1e-5) and a non-zero gradient w.r.t. per_token_logps on MLX and torch."""

from __future__ import annotations

import numpy as np
import pytest
from test_preference_losses import LOGPS, MASK, REF
from test_preference_losses_other import KTO_LOGPS, kto_batch

from algorithms.ops import NumpyOps
from algorithms.preference import cpo, dpo, kto, orpo

PAIRED = {"loss_mask": MASK, "ref_per_token_logps": REF}
WPO_NORM = -np.ones_like(LOGPS)  # log sum_v p_v^2 per token, a model output given by hand


def with_log_sum_sq(loss):
    """``loss`` called on the log-probs alone, the WPO normaliser fixed to WPO_NORM."""
    return lambda ops, logps, batch: loss(
        ops, {"logps": logps, "log_sum_sq": ops.asarray(WPO_NORM)}, batch)


CASES = {
    # sort (aot), cumsum (LD-DPO), WPO weights, several losses (MPO) in one config
    "dpo": (dpo.make_loss(dpo.DPOConfig(
        data="x", beta=0.5, loss_type=["sigmoid", "ipo", "aot_unpaired", "sft"],
        loss_weights=["1", "0.5", "0.3", "0.2"], ld_alpha=0.5,
        f_divergence_type="alpha_divergence")), LOGPS, PAIRED),
    "dpo_wpo": (with_log_sum_sq(dpo.make_loss(dpo.DPOConfig(data="x", use_weighting=True))),
                LOGPS, PAIRED),
    "cpo": (cpo.make_loss(cpo.CPOConfig(data="x", label_smoothing=0.1)), LOGPS, PAIRED),
    "simpo": (cpo.make_loss(cpo.SimPOConfig(data="x", alpha=0.5)), LOGPS, PAIRED),
    "orpo": (orpo.make_loss(orpo.ORPOConfig(data="x")), LOGPS, PAIRED),
    "kto": (kto.make_loss(kto.KTOConfig(data="x")), KTO_LOGPS, kto_batch(-1.5)),
}


def _numpy(name):
    fn, lp, b = CASES[name]
    return float(fn(NumpyOps(), lp, b)[0])


@pytest.mark.parametrize("name", list(CASES))
def test_torch_matches_numpy_with_gradient(name):
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    fn, lp, b = CASES[name]
    tb = {k: torch.tensor(v, dtype=torch.float32) for k, v in b.items()}
    x = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    loss, metrics = fn(TorchOps(), x, tb)
    loss.backward()
    assert loss.item() == pytest.approx(_numpy(name), rel=1e-5)
    assert x.grad.abs().sum().item() > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.mark.parametrize("name", list(CASES))
def test_mlx_matches_numpy_and_torch_gradient(name):
    mx = pytest.importorskip("mlx.core")
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps
    from mlx_ft.ops import MLXOps

    fn, lp, b = CASES[name]
    mb = {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in b.items()}
    value, grad = mx.value_and_grad(lambda x: fn(MLXOps(), x, mb)[0])(
        mx.array(lp.astype(np.float32)))
    assert value.item() == pytest.approx(_numpy(name), rel=1e-5)
    grad = np.array(grad)
    assert np.abs(grad).sum() > 0

    x = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    fn(TorchOps(), x, {k: torch.tensor(v, dtype=torch.float32) for k, v in b.items()})[0].backward()
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-5, atol=1e-6)
