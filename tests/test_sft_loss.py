"""SFT losses against values computed by hand, and their gradients on each backend's shim."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.ops import NumpyOps
from algorithms.sft import dft_loss, nll_loss

# Two rows; the last position of each is masked. Loss tokens: -1, -2, -3, -0.1 (N = 4).
LOGPS = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, 0.0]])
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
LOGPS32, MASK32 = LOGPS.astype(np.float32), MASK.astype(np.float32)
# nll = (1 + 2 + 3 + 0.1) / 4
NLL = 1.525
# dft = (e^-1 * 1 + e^-2 * 2 + e^-3 * 3 + e^-0.1 * 0.1) / 4
DFT = 0.2195987386379639


def _batch(num_items=4.0):
    return {"loss_mask": MASK, "num_items": num_items}


def test_nll_by_hand():
    loss, metrics = nll_loss(NumpyOps(), LOGPS, _batch())
    assert loss == pytest.approx(NLL, rel=1e-12)
    assert metrics["ntokens"] == 4


def test_dft_by_hand():
    loss, _ = dft_loss(NumpyOps(), LOGPS, _batch())
    assert loss == pytest.approx(DFT, rel=1e-12)


def test_num_items_is_the_denominator():
    # The accumulated-batch denominator, not this micro-batch's token count, divides the sum.
    loss, _ = nll_loss(NumpyOps(), LOGPS, _batch(num_items=8.0))
    assert loss == pytest.approx(NLL / 2, rel=1e-12)


def test_fully_masked_rows_contribute_nothing():
    mask = MASK.copy()
    mask[1] = 0
    loss, _ = nll_loss(NumpyOps(), LOGPS, {"loss_mask": mask, "num_items": 2.0})
    assert loss == pytest.approx(1.5, rel=1e-12)


def test_mlx_gradients():
    mx = pytest.importorskip("mlx.core")
    from mlx_ft.ops import MLXOps

    ops = MLXOps()
    batch = {"loss_mask": mx.array(MASK32), "num_items": mx.array(4.0)}
    for fn, expected_grad in ((nll_loss, -MASK / 4), (dft_loss, -np.exp(LOGPS) * MASK / 4)):
        value, grad = mx.value_and_grad(lambda lp, fn=fn: fn(ops, lp, batch)[0])(mx.array(LOGPS32))
        assert value.item() == pytest.approx(NLL if fn is nll_loss else DFT, rel=1e-6)
        # dft's weight is a stop-gradient: d/dlogp (-sg(p) logp) = -p, not -p(1 + logp).
        np.testing.assert_allclose(np.array(grad), expected_grad, rtol=1e-6, atol=1e-7)


def test_torch_gradients():
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    ops = TorchOps()
    batch = {"loss_mask": torch.tensor(MASK32), "num_items": torch.tensor(4.0)}
    for fn, expected, expected_grad in ((nll_loss, NLL, -MASK / 4),
                                        (dft_loss, DFT, -np.exp(LOGPS) * MASK / 4)):
        lp = torch.tensor(LOGPS32, requires_grad=True)
        loss, _ = fn(ops, lp, batch)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(lp.grad.numpy(), expected_grad, rtol=1e-6, atol=1e-7)
