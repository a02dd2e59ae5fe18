"""The policy loss's newer terms (algorithms.rl.policy_loss): PPO's clipped value loss, RLOO's
sequence-sum ratio, the unclipped (plain) estimator, k1/k2 KL loss terms, the entropy bonus and
the high-entropy token mask. Values by hand; gradients by hand on NumPy, MLX and torch."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.ops import NumpyOps
from algorithms.rl.policy_loss import make_loss, value_loss
from algorithms.rl.presets import GRPOConfig, PPOConfig, RLOOConfig

e = np.exp
LOGP = np.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.2]])
MASK = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADV = np.array([2.0, -1.0])
ENTROPY = np.array([[1.5, 0.5, 2.0], [0.25, 1.0, 9.0]])  # 9 sits off the mask
NUM_ITEMS = 5.0


def _cfg(cls=GRPOConfig, **kw):
    base = {"data": "x", "reward": ["r"], "max_completion_length": 8, "beta": 0.0}
    cfg = cls(**{**base, **kw})
    cfg.validate()
    return cfg


def _batch(**extra):
    return {"loss_mask": MASK, "advantages": ADV, "num_items": np.float64(NUM_ITEMS),
            "micro_fraction": np.float64(1.0), **extra}


def _loss(cfg, batch, outputs):
    loss, metrics = make_loss(cfg)(NumpyOps(), {"logps": LOGP, **outputs}, batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


# -- values ------------------------------------------------------------------------------------

def test_value_loss_clipping_by_hand():
    # c = 0.2. token 0: V 1.0, V_old 0.5, R 0.6: plain 0.16, clipped V 0.7 -> 0.01: max 0.16
    # token 1: V 1.0, V_old 0.5, R 1.2: plain 0.04, clipped 0.7 -> 0.25: the clipped branch
    # token 2: V 0.3, V_old 0.3, R 0.0: both 0.09
    ops = NumpyOps()
    values = np.array([[1.0, 1.0, 0.3]])
    batch = {"returns": np.array([[0.6, 1.2, 0.0]]), "old_values": np.array([[0.5, 0.5, 0.3]])}
    loss, clipped = value_loss(ops, values, batch, 0.2)
    np.testing.assert_allclose(loss, [[0.08, 0.125, 0.045]], rtol=1e-12)
    np.testing.assert_array_equal(clipped, [[False, True, False]])


def test_ppo_loss_adds_the_weighted_value_loss():
    # on-policy, dapo aggregation: policy term = sum(-A m) / 5 = (-6 + 2) / 5 = -0.8
    # values: V = returns + 0.1 on every token, V_old = V: value loss 0.5 * 0.01 per token
    values = np.full(LOGP.shape, 0.4)
    batch = _batch(returns=values - 0.1, old_values=values)
    cfg = _cfg(PPOConfig)
    loss, metrics = _loss(cfg, batch, {"values": values, "entropy": ENTROPY})
    assert metrics["loss/policy"] == pytest.approx(-0.8)
    assert metrics["loss/value"] == pytest.approx(0.005)
    assert loss == pytest.approx(-0.8 + 0.1 * 0.005)
    assert metrics["values/mean"] == pytest.approx(0.4)
    assert metrics["values/clip_ratio"] == 0.0
    assert metrics["entropy"] == pytest.approx((1.5 + 0.5 + 2.0 + 0.25 + 1.0) / 5)


def test_rloo_sequence_sum_ratio_by_hand():
    # RLOO: w_i = exp(sum_t lr_it); eps 0.2. Row 0 lr sum 0.1 + 0.1 - 0.1 = 0.1: w = e^0.1
    # (A > 0, inside [0.8, 1.2]) -> l_0 = -2 e^0.1 on each token; row 1 lr sum -0.3 (+ off-mask
    # -5 ignored): w = e^-0.3 < 0.8 with A < 0: clipped, l_1 = 0.8. grpo mean over rows.
    lr = np.array([[0.1, 0.1, -0.1], [-0.2, -0.1, -5.0]])
    cfg = _cfg(RLOOConfig, beta=0.0)
    loss, metrics = _loss(cfg, _batch(old_per_token_logps=LOGP - lr), {})
    assert loss == pytest.approx((-2 * e(0.1) + 0.8) / 2, rel=1e-12)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 5)
    # plain (unclipped): l_1 = -A w = e^-0.3
    plain = _cfg(RLOOConfig, beta=0.0, clip_policy_ratio=False)
    loss, metrics = _loss(plain, _batch(old_per_token_logps=LOGP - lr), {})
    assert loss == pytest.approx((-2 * e(0.1) + e(-0.3)) / 2, rel=1e-12)
    assert metrics["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize(("estimator", "kl"), [
    ("k1", lambda d: d), ("k2", lambda d: 0.5 * d * d), ("k3", lambda d: e(-d) + d - 1)])
def test_kl_loss_terms(estimator, kl):
    # d = logp - ref = [[0.5, -0.5, 0.1], [0.2, -1.0, x]]
    d = np.array([[0.5, -0.5, 0.1], [0.2, -1.0, 3.0]])
    cfg = _cfg(loss_type="dapo", beta=0.1, kl_estimator=estimator)
    loss, metrics = _loss(cfg, _batch(ref_per_token_logps=LOGP - d), {})
    want_kl = kl(d) * MASK
    assert loss == pytest.approx(((-ADV[:, None] + 0.1 * want_kl) * MASK).sum() / NUM_ITEMS)
    assert metrics["kl"] == pytest.approx(want_kl.sum() / NUM_ITEMS)


def test_entropy_bonus_and_high_entropy_mask():
    # dapo, on-policy: policy term -0.8 (see above); bonus 0.01 x token-mean entropy 5.25 / 5
    cfg = _cfg(loss_type="dapo", entropy_coef=0.01)
    loss, _ = _loss(cfg, _batch(), {"entropy": ENTROPY})
    assert loss == pytest.approx(-0.8 - 0.01 * 5.25 / 5, rel=1e-12)
    # the mask keeps row 0 tokens 0 and 2 only: policy term -2 * 2 / 5
    keep = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss, _ = _loss(_cfg(loss_type="dapo"), _batch(entropy_mask=keep), {"entropy": ENTROPY})
    assert loss == pytest.approx(-4 / 5, rel=1e-12)


# -- gradients ---------------------------------------------------------------------------------

VALUES = np.array([[1.0, 1.0, 0.3], [0.2, 0.9, 0.0]])
VALUE_BATCH = {"returns": np.array([[0.6, 1.2, 0.0], [0.5, 0.9, 0.0]]),
               "old_values": np.array([[0.5, 0.5, 0.3], [0.2, 0.9, 0.0]])}


def _grad_cases():
    lr = np.array([[0.1, 0.1, -0.1], [-0.2, -0.1, -5.0]])
    w0, w1 = e(0.1), e(-0.3)
    return {
        # RLOO: d l_i / d logp_t = -A_i w_i on every token of row i, / B (grpo mean)
        "rloo": (_cfg(RLOOConfig, beta=0.0), _batch(old_per_token_logps=LOGP - lr), {},
                 {"logps": np.array([[-2 * w0] * 3, [0, 0, 0]]) / 2}),
        "rloo_plain": (_cfg(RLOOConfig, beta=0.0, clip_policy_ratio=False),
                       _batch(old_per_token_logps=LOGP - lr), {},
                       {"logps": np.array([[-2 * w0] * 3, [w1, w1, 0]]) / 2}),
        # entropy bonus: d/dH = -c / num_items on the mask
        "entropy": (_cfg(loss_type="dapo", entropy_coef=0.01), _batch(), {"entropy": ENTROPY},
                    {"logps": -ADV[:, None] * MASK / NUM_ITEMS,
                     "entropy": -0.01 * MASK / NUM_ITEMS}),
        # PPO: d vf / dV = (V - R) on the plain branch, 0 where the clipped branch wins (row 0
        # token 1) and off the mask; times vf_coef / num_items
        "ppo": (_cfg(PPOConfig), _batch(**VALUE_BATCH), {"values": VALUES, "entropy": ENTROPY},
                {"logps": -ADV[:, None] * MASK / NUM_ITEMS,
                 "values": 0.1 * np.array([[0.4, 0.0, 0.3], [-0.3, 0.0, 0.0]]) / NUM_ITEMS}),
    }


def _mlx_grads(cfg, batch, outputs):
    mx = pytest.importorskip("mlx.core")
    from mlx_ft.ops import MLXOps

    names = ["logps", *outputs]
    arrays = [mx.array(np.asarray(x, np.float32)) for x in [LOGP, *outputs.values()]]
    mb = {k: mx.array(np.asarray(v, np.float32)) for k, v in batch.items()}
    loss_fn = make_loss(cfg)

    def f(*xs):
        return loss_fn(MLXOps(), dict(zip(names, xs)), mb)[0]

    value, grads = mx.value_and_grad(f, argnums=tuple(range(len(arrays))))(*arrays)
    grads = grads if isinstance(grads, (list, tuple)) else [grads]
    return value.item(), {n: np.array(g) for n, g in zip(names, grads)}


def _torch_grads(cfg, batch, outputs):
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    xs = {n: torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=True)
          for n, v in {"logps": LOGP, **outputs}.items()}
    tb = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in batch.items()}
    loss, _ = make_loss(cfg)(TorchOps(), xs, tb)
    loss.backward()
    return loss.item(), {n: x.grad.numpy() for n, x in xs.items() if x.grad is not None}


@pytest.mark.parametrize("name", list(_grad_cases()))
def test_gradients_mlx_torch_and_hand(name):
    cfg, batch, outputs, want = _grad_cases()[name]
    v_np, _ = _loss(cfg, batch, outputs)
    (v_mx, g_mx), (v_pt, g_pt) = _mlx_grads(cfg, batch, outputs), _torch_grads(cfg, batch, outputs)
    assert v_mx == pytest.approx(v_np, rel=1e-6) and v_pt == pytest.approx(v_np, rel=1e-6)
    for key, expected in want.items():
        np.testing.assert_allclose(g_mx[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(g_pt[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
        assert np.abs(g_mx[key]).sum() > 0


def test_ppo_micro_batches_sum_to_the_step_loss():
    cfg = _cfg(PPOConfig)
    outputs = {"values": VALUES, "entropy": ENTROPY}
    whole, _ = _loss(cfg, _batch(**VALUE_BATCH), outputs)
    parts = 0.0
    for row in (0, 1):
        part = {k: (v[row:row + 1] if np.ndim(v) else v)
                for k, v in _batch(**VALUE_BATCH).items()}
        part["micro_fraction"] = np.float64(0.5)
        loss, _ = make_loss(cfg)(NumpyOps(), {"logps": LOGP[row:row + 1],
                                              **{k: v[row:row + 1] for k, v in outputs.items()}},
                                 part)
        parts += float(loss)
    assert parts == pytest.approx(whole, rel=1e-12)


def test_make_loss_declares_what_it_reads():
    assert dict(make_loss(_cfg()).outputs) == {"logps": True, "entropy": False}
    assert dict(make_loss(_cfg(entropy_coef=0.1)).outputs) == {"logps": True, "entropy": True}
    assert dict(make_loss(_cfg(PPOConfig)).outputs) == {"logps": True, "entropy": False,
                                                         "values": True}
