"""The policy-loss types beyond the clipped PPO objective (docs/ALGORITHMS.md section 9):
cispo, sapo, luspo, vespo, each against values and derivatives computed by hand, on NumpyOps
(float64) and through MLX and torch autograd.

Shared fixture (the one of tests/test_rl_loss.py): two rows, 3 and 2 loss tokens, advantages
2 and -1, log-ratios ``lr`` (w = e^lr), ``num_items`` 10, ``micro_fraction`` 0.5.
"""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.config import ConfigError
from algorithms.ops import NumpyOps
from algorithms.rl.policy_loss import make_loss
from algorithms.rl.presets import GRPOConfig

e = np.exp
LOGP = np.array([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -1.2, -0.9]])
MASK = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
ADV = np.array([2.0, -1.0])
LR = np.array([[-0.5, 0.1, 0.3, 0.7], [-0.4, 0.4, 0.9, -0.6]])
NUM_ITEMS, F = 10.0, 0.5
W = e(LR) * MASK


def _cfg(**kw):
    cfg = GRPOConfig(**{"data": "x", "reward": ["r"], "max_completion_length": 8, "beta": 0.0,
                        "epsilon": 0.2, "epsilon_high": 0.28, **kw})
    cfg.validate()
    return cfg


def _batch(lr=LR, adv=ADV, mask=MASK, logp=LOGP):
    batch = {"loss_mask": mask, "advantages": adv, "num_items": np.float64(NUM_ITEMS),
             "micro_fraction": np.float64(F)}
    if lr is not None:
        batch["old_per_token_logps"] = logp - lr
    return batch


def _np(cfg, batch, logp=LOGP):
    loss, metrics = make_loss(cfg)(NumpyOps(), logp, batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _sigmoid(x):
    return 1 / (1 + e(-x))


# -- hand values: l_t per token, d l_t / d log p_t, and the aggregation weight W_i -----------

def cispo_hand():
    cap = np.minimum(W, 1.28)                      # row 0 token 2 and row 1 token 1 capped
    loss_t = -cap * ADV[:, None] * LOGP * MASK
    grad_t = -cap * ADV[:, None] * MASK            # the weight is detached
    return loss_t.sum() / NUM_ITEMS, grad_t / NUM_ITEMS


def sapo_hand():
    tau = np.where(ADV > 0, 1.0, 1.05)[:, None]
    gate = _sigmoid(tau * (W - 1))
    loss_t = -(4 / tau) * gate * ADV[:, None] * MASK
    grad_t = -4 * gate * (1 - gate) * W * ADV[:, None] * MASK     # d w / d log p = w
    weight = F / (2 * MASK.sum(axis=1, keepdims=True))           # grpo: f / (B n_i)
    return (loss_t * weight).sum(), grad_t * weight


def luspo_hand():
    # sequence level (the paper's GSPO ratio): s_0 = e^(-0.1 / 3) inside [0.8, 1.28] (A > 0:
    # unclipped, l = -2 s_0 on 3 tokens), s_1 = e^0 = 1 (l = +1 on 2 tokens)
    s0 = e(-0.1 / 3)
    per_row = np.array([3 * -2 * s0, 2 * 1.0])          # sum_t l_t = |o_i| l_i
    grad = np.array([[-2 * s0 / 3 * 3] * 3 + [0], [1.0 / 2 * 2] * 2 + [0, 0]])
    return per_row.mean() * F, grad * F / 2


def vespo_hand():
    log_w = np.array([-0.5 + 0.1 + 0.3, -0.4 + 0.4])    # masked sums of the log-ratios
    k, lam = np.array([2.0, 3.0]), np.array([3.0, 2.0])  # A_0 >= 0: pos; A_1 < 0: neg
    phi = e(lam + k * log_w - lam * e(log_w))[:, None]
    loss_t = -phi * ADV[:, None] * LOGP * MASK
    return loss_t.sum() / NUM_ITEMS, -phi * ADV[:, None] * MASK / NUM_ITEMS


HAND = {"cispo": ({}, cispo_hand), "sapo": ({}, sapo_hand),
        "luspo": ({"importance_sampling_level": "sequence"}, luspo_hand),
        "vespo": ({}, vespo_hand)}


@pytest.mark.parametrize("loss_type", list(HAND))
def test_loss_matches_the_hand_computation(loss_type):
    kw, hand = HAND[loss_type]
    loss, metrics = _np(_cfg(loss_type=loss_type, **kw), _batch())
    assert loss == pytest.approx(hand()[0], rel=1e-12)
    assert metrics["ratio/mean"] > 0


def test_cispo_caps_every_sign_and_logs_it():
    _, metrics = _np(_cfg(loss_type="cispo"), _batch())
    # capped: row 0 token 2 (A > 0) and row 1 token 1 (A < 0), 2 of 5 loss tokens
    assert metrics["clip_ratio/high_mean"] == pytest.approx(2 / 5)
    assert metrics["clip_ratio/low_mean"] == 0.0


def test_vespo_weight_is_one_on_policy_and_vanishes_far_off_policy():
    _, metrics = _np(_cfg(loss_type="vespo"), _batch(lr=None))
    assert metrics["vespo/phi_mean"] == pytest.approx(1.0, rel=1e-12)
    # a summed log-ratio of 30 is clamped at 20: phi = exp(3 + 40 - 3 e^20) = 0, no NaN;
    # -30 is clamped at log 1e-8: phi = exp(3 + 2 log 1e-8 - 3e-8) ~ 2e-15
    far = np.array([[10.0, 10.0, 10.0, 0.0], [-15.0, -15.0, 0.0, 0.0]])
    loss, metrics = _np(_cfg(loss_type="vespo"), _batch(lr=far, adv=np.array([2.0, 1.0])))
    assert np.isfinite(loss) and abs(loss) < 1e-12
    assert metrics["vespo/phi_mean"] == pytest.approx(2 * e(3 + 2 * np.log(1e-8) - 3e-8) / 5,
                                                      rel=1e-6)


def test_sapo_gate_is_the_plain_gradient_at_ratio_one():
    # on-policy: sigma(0) = 1/2, so l = -(2 / tau) A and d l / d log p = -A (slope 4 x 1/4)
    loss, _ = _np(_cfg(loss_type="sapo"), _batch(lr=None))
    expected = F * np.mean([-2 / 1.0 * 2.0, -2 / 1.05 * -1.0])
    assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss_type", list(HAND))
def test_micro_batches_sum_to_the_step_loss(loss_type):
    """Each aggregation is a sum over micro-batches: rows 0 and 1 apart (f = 1/2 each) equal
    both together."""
    kw, _ = HAND[loss_type]
    cfg = _cfg(loss_type=loss_type, **kw)
    whole, _ = _np(cfg, {**_batch(), "micro_fraction": np.float64(1.0)})
    parts = 0.0
    for r in (0, 1):
        part = {k: (v[r:r + 1] if np.ndim(v) else v) for k, v in _batch().items()}
        parts += _np(cfg, part, LOGP[r:r + 1])[0]
    assert parts == pytest.approx(whole, rel=1e-12)


def _mlx_grad(cfg, batch):
    mx = pytest.importorskip("mlx.core")
    from mlx_ft.ops import MLXOps

    mb = {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in batch.items()}
    value, grad = mx.value_and_grad(lambda x: make_loss(cfg)(MLXOps(), x, mb)[0])(
        mx.array(LOGP.astype(np.float32)))
    return value.item(), np.array(grad)


def _torch_grad(cfg, batch):
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    tb = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in batch.items()}
    x = torch.tensor(LOGP, dtype=torch.float32, requires_grad=True)
    loss, _ = make_loss(cfg)(TorchOps(), x, tb)
    loss.backward()
    return loss.item(), x.grad.numpy()


@pytest.mark.parametrize("loss_type", list(HAND))
def test_gradients_mlx_torch_and_hand(loss_type):
    kw, hand = HAND[loss_type]
    cfg, batch = _cfg(loss_type=loss_type, **kw), _batch()
    want_loss, want_grad = hand()
    (v_mx, g_mx), (v_pt, g_pt) = _mlx_grad(cfg, batch), _torch_grad(cfg, batch)
    assert v_mx == pytest.approx(want_loss, rel=1e-5) and v_pt == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(g_mx, want_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_pt, want_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(g_mx).sum() > 0


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "vespo", "luspo"])
def test_on_policy_gradient_is_the_policy_gradient(loss_type):
    """At w = 1 every type's gradient is -A x its aggregation weight (regression: a gate whose
    slope at 1 is not 1 would rescale the learning rate)."""
    cfg = _cfg(loss_type=loss_type)
    _, grad = _torch_grad(cfg, _batch(lr=None))
    weight = {"cispo": 1 / NUM_ITEMS, "vespo": 1 / NUM_ITEMS,
              "sapo": F / (2 * MASK.sum(axis=1, keepdims=True)), "luspo": F / 2}[loss_type]
    np.testing.assert_allclose(grad, -ADV[:, None] * MASK * weight, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kw,flag", [
    ({"loss_type": "vespo", "importance_sampling_level": "sequence"},
     "--importance-sampling-level"),
    ({"loss_type": "sapo", "delta": 2.0}, "--delta"),
    ({"loss_type": "cispo", "clip_policy_ratio": False}, "--clip-policy-ratio"),
    ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, "--sapo-temperature-neg"),
    ({"loss_type": "vespo", "vespo_lambda_pos": -1.0}, "--vespo-lambda-pos"),
    ({"loss_type": "vespo", "vespo_k_neg": -1.0}, "--vespo-k-neg"),
])
def test_validation_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        _cfg(**kw)
