"""GRPO-family policy loss (docs/ALGORITHMS.md section 9) and its config.

Every expected loss and gradient is written from the hand computation: per-token losses ``l``
and derivatives ``dl/dlogp`` below, times the aggregation weight of each row, ``W_i``:
grpo ``f / (B n_i)``, bnpo ``f / M``, dr_grpo ``f / (B L_max)``, dapo ``1 / num_items``
(``n_i`` tokens of row i, ``M`` tokens of the micro-batch, ``f`` its micro_fraction).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from algorithms.config import ConfigError, build_config
from algorithms.ops import NumpyOps
from algorithms.rl.policy_loss import make_loss
from algorithms.rl.presets import DAPOConfig, DrGRPOConfig, GRPOConfig, GSPOConfig

e = np.exp
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LOGP = np.array([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -1.2, -0.9]])
MASK = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
ADV = np.array([2.0, -1.0])
# log pi - log pi_old; the last columns are off the mask and must not matter
LR = np.array([[-0.5, 0.1, 0.3, 0.7], [-0.4, 0.4, 0.9, -0.6]])
L_MAX, NUM_ITEMS, F = 8, 10.0, 0.5

# eps 0.2 / eps_high 0.28. Row 0 (A = 2): w = e^-0.5 (below 0.8 but A > 0: not clipped),
# e^0.1 (inside), e^0.3 > 1.28 (clipped high: l = -2 * 1.28, no gradient).
# Row 1 (A = -1): e^-0.4 < 0.8 (clipped low: l = 0.8, no gradient), e^0.4 > 1.28 (A < 0: not
# clipped, l = w).
L_CLIP = np.array([[-2 * e(-0.5), -2 * e(0.1), -2.56, 0], [0.8, e(0.4), 0, 0]])
G_CLIP = np.array([[-2 * e(-0.5), -2 * e(0.1), 0, 0], [0, e(0.4), 0, 0]])


def _cfg(cls=GRPOConfig, **kw):
    base = {"data": "x", "reward": ["r"], "max_completion_length": L_MAX, "beta": 0.0,
            "epsilon": 0.2, "epsilon_high": 0.28}
    cfg = cls(**{**base, **kw})
    cfg.validate()
    return cfg


def _batch(mask=MASK, adv=ADV, lr=None, logp=LOGP, **extra):
    batch = {"loss_mask": mask, "advantages": adv, "num_items": np.float64(NUM_ITEMS),
             "micro_fraction": np.float64(F), **extra}
    if lr is not None:
        batch["old_per_token_logps"] = logp - lr
    return batch


def _weights(loss_type, mask=MASK, f=F, num_items=NUM_ITEMS):
    """``W_i`` [B, 1] from the module docstring's table (hand formula)."""
    b, n = mask.shape[0], mask.sum(axis=1, keepdims=True)
    return {"grpo": f / (b * np.maximum(n, 1)), "bnpo": np.full((b, 1), f / mask.sum()),
            "dr_grpo": np.full((b, 1), f / (b * L_MAX)),
            "dapo": np.full((b, 1), 1 / num_items)}[loss_type]


def _np_loss(cfg, batch, logp=LOGP):
    loss, metrics = make_loss(cfg)(NumpyOps(), logp, batch)
    return float(loss), {k: float(v) for k, v in metrics.items()}


# -- values (NumpyOps, float64) ----------------------------------------------------------------

@pytest.mark.parametrize("loss_type,expected", [
    # l_t = -A_i: rows sum to -6 (3 tokens) and +2 (2 tokens), M = 5, B = 2, f = 0.5
    ("grpo", 0.5 * (-2 + 1) / 2), ("bnpo", 0.5 * -4 / 5), ("dr_grpo", 0.5 * -4 / 16),
    ("dapo", -4 / 10),
])
def test_ratio_one(loss_type, expected):
    loss, metrics = _np_loss(_cfg(loss_type=loss_type), _batch())
    assert loss == pytest.approx(expected, rel=1e-12)
    assert metrics["ratio/mean"] == 1.0
    assert metrics["clip_ratio/region_mean"] == 0.0 and "kl" not in metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_clipping_low_and_high(loss_type):
    loss, metrics = _np_loss(_cfg(loss_type=loss_type), _batch(lr=LR))
    assert loss == pytest.approx(np.sum(_weights(loss_type) * L_CLIP * MASK), rel=1e-12)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 5)    # row 1 token 0
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 5)   # row 0 token 2
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 5)
    ratios = [e(-0.5), e(0.1), e(0.3), e(-0.4), e(0.4)]
    assert metrics["ratio/mean"] == pytest.approx(np.mean(ratios))


def test_clipping_not_engaging():
    # clip range [0.1, 1.9] holds every ratio: l = -A w everywhere
    loss, metrics = _np_loss(_cfg(loss_type="dapo", epsilon=0.9, epsilon_high=0), _batch(lr=LR))
    expected = np.array([[-2 * e(-0.5), -2 * e(0.1), -2 * e(0.3)], [e(-0.4), e(0.4), 0]])
    assert loss == pytest.approx(expected.sum() / NUM_ITEMS, rel=1e-12)
    assert metrics["clip_ratio/region_mean"] == 0.0


def test_delta_caps_the_unclipped_ratio():
    # delta 1.4: row 1 token 1 (w = e^0.4 = 1.49, A < 0) now costs 1.4 instead of w
    loss, _ = _np_loss(_cfg(loss_type="dapo", delta=1.4), _batch(lr=LR))
    capped = L_CLIP.copy()
    capped[1, 1] = 1.4
    assert loss == pytest.approx(capped.sum() / NUM_ITEMS, rel=1e-12)


# eps 0.02 both sides. Sequence level: s_0 = e^(-0.1/3) (A > 0, below 0.98: not clipped, l = -2 s_0
# on each token), s_1 = e^(-0.3) (A < 0, below 0.98: clipped, l = 0.98, no gradient).
LR_SEQ = np.array([[-0.5, 0.1, 0.3, 0.7], [-0.4, -0.2, 0.9, -0.6]])
S0 = e(-0.1 / 3)


def test_sequence_level_gspo_vs_token_level():
    seq = _cfg(epsilon=0.02, epsilon_high=0.02, importance_sampling_level="sequence")
    loss, metrics = _np_loss(seq, _batch(lr=LR_SEQ))
    assert loss == pytest.approx(F * (-2 * S0 + 0.98) / 2, rel=1e-12)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(2 / 5)  # both tokens of row 1
    assert metrics["ratio/mean"] == pytest.approx((3 * S0 + 2 * e(-0.3)) / 5)
    # token level on the same ratios: row 0 tokens 1 and 2 are clipped at 1.02, row 1 at 0.98
    tok = _cfg(epsilon=0.02, epsilon_high=0.02)
    loss_tok, _ = _np_loss(tok, _batch(lr=LR_SEQ))
    assert loss_tok == pytest.approx(F * ((-2 * e(-0.5) - 4 * 1.02) / 3 + 0.98) / 2, rel=1e-12)


D_REF = np.array([[0.5, -0.5, 0.0, 9.0], [0.2, 1.0, 9.0, 9.0]])  # ref - logp; 9s off the mask
KL = (e(D_REF) - D_REF - 1) * MASK


def test_kl_term():
    cfg = _cfg(loss_type="dapo", beta=0.1)
    loss, metrics = _np_loss(cfg, _batch(ref_per_token_logps=LOGP + D_REF))
    expected = np.sum((-ADV[:, None] + 0.1 * KL) * MASK) / NUM_ITEMS
    assert loss == pytest.approx(expected, rel=1e-12)
    assert metrics["kl"] == pytest.approx(KL.sum() / 5, rel=1e-12)
    with pytest.raises(KeyError, match="ref_per_token_logps"):
        _np_loss(cfg, _batch())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_row_and_all_masked_batch(loss_type):
    mask = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss, metrics = _np_loss(_cfg(loss_type=loss_type), _batch(mask=mask, lr=LR))
    row0 = L_CLIP[0].sum()
    expected = {"grpo": F * row0 / 3 / 2, "bnpo": F * row0 / 3, "dr_grpo": F * row0 / 16,
                "dapo": row0 / NUM_ITEMS}[loss_type]
    assert loss == pytest.approx(expected, rel=1e-12)
    loss, metrics = _np_loss(_cfg(loss_type=loss_type), _batch(mask=0 * MASK, lr=LR))
    assert loss == 0.0 and all(np.isfinite(v) for v in metrics.values())


# -- the loop's invariant: micro-batches of a step sum to the step's loss ------------------------

LOGP4 = np.array([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -1.2, -0.9],
                  [-0.2, -1.1, -0.4, -2.2], [-0.6, -0.8, -1.4, -0.1]])
MASK4 = np.array([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # 3+2 | 4+1 tokens
LR4 = np.array([[-0.5, 0.1, 0.3, 0.7], [-0.4, 0.4, 0.9, -0.6],
                [0.05, -0.3, 0.35, 0.1], [-0.25, 0.2, 0.0, 0.4]])
BATCH4 = {"loss_mask": MASK4, "advantages": np.array([2.0, -1.0, 0.5, -0.7]),
          "old_per_token_logps": LOGP4 - LR4, "ref_per_token_logps": LOGP4 + 0.1 * LR4 - 0.05,
          "num_items": np.float64(MASK4.sum())}


def _split(rows, fraction):
    part = {k: (v[rows] if np.ndim(v) else v) for k, v in BATCH4.items()}
    return {**part, "micro_fraction": np.float64(fraction)}, LOGP4[rows]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_the_step_loss(loss_type, level):
    cfg = _cfg(loss_type=loss_type, beta=0.05, delta=2.0, importance_sampling_level=level)
    whole, _ = _np_loss(cfg, {**BATCH4, "micro_fraction": np.float64(1.0)}, LOGP4)
    # an even split (5 tokens each side) holds for every type; bnpo needs that evenness
    halves = [_np_loss(cfg, *_split(r, 0.5)) for r in (slice(0, 2), slice(2, 4))]
    assert sum(h[0] for h in halves) == pytest.approx(whole, rel=1e-12)
    if loss_type != "bnpo":
        parts = [_np_loss(cfg, *_split(r, f)) for r, f in ((slice(0, 1), 0.25),
                                                             (slice(1, 4), 0.75))]
        assert sum(p[0] for p in parts) == pytest.approx(whole, rel=1e-12)


def test_bnpo_normalises_by_the_micro_batch_tokens():
    # one row alone (f = 1/4) at ratio 1: its own token mean -A_0 = -2, times f
    batch, logp = _split(slice(0, 1), 0.25)
    del batch["old_per_token_logps"]
    loss, _ = _np_loss(_cfg(loss_type="bnpo"), batch, logp)
    assert loss == pytest.approx(-2 * 0.25, rel=1e-12)


# -- gradients: MLX and torch agree with each other and with the hand derivative ------------------

GRAD_CASES = {
    # ratio 1: dl/dlogp = -A_i, times W_i
    **{f"ratio1-{t}": ({"loss_type": t}, {}, -ADV[:, None] * MASK * _weights(t))
       for t in LOSS_TYPES},
    **{f"clipped-{t}": ({"loss_type": t}, {"lr": LR}, G_CLIP * _weights(t))
       for t in LOSS_TYPES},
    # the capped token (row 1 token 1) has no gradient either
    "delta": ({"loss_type": "dapo", "delta": 1.4}, {"lr": LR},
              G_CLIP * np.array([[1.0, 1, 1, 1], [1, 0, 1, 1]]) / NUM_ITEMS),
    # GSPO: d s_i / d logp_t = s_i / n_i on every token of row i; the grpo loss of row i is
    # its (constant) token loss l_i = -A_i s_i, weighted f / B; row 1 is clipped
    "sequence": ({"epsilon": 0.02, "epsilon_high": 0.02, "importance_sampling_level": "sequence"},
                 {"lr": LR_SEQ}, np.array([[-2 * S0 / 3] * 3 + [0], [0] * 4]) * F / 2),
    # k3: d/dlogp [exp(d) - d - 1] = 1 - exp(d), d = ref - logp
    "kl": ({"loss_type": "dapo", "beta": 0.1}, {"ref_per_token_logps": LOGP + D_REF},
           (-ADV[:, None] + 0.1 * (1 - e(D_REF))) * MASK / NUM_ITEMS),
}


def _mlx(cfg, batch):
    mx = pytest.importorskip("mlx.core")
    from mlx_ft.ops import MLXOps

    mb = {k: mx.array(np.asarray(v, dtype=np.float32)) for k, v in batch.items()}
    loss_fn = make_loss(cfg)
    value, grad = mx.value_and_grad(lambda x: loss_fn(MLXOps(), x, mb)[0])(
        mx.array(LOGP.astype(np.float32)))
    return value.item(), np.array(grad)


def _torch(cfg, batch):
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    tb = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in batch.items()}
    x = torch.tensor(LOGP, dtype=torch.float32, requires_grad=True)
    loss, _ = make_loss(cfg)(TorchOps(), x, tb)
    loss.backward()
    return loss.item(), x.grad.numpy()


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_mlx_torch_and_hand(name):
    kw, batch_kw, expected_grad = GRAD_CASES[name]
    cfg, batch = _cfg(**kw), _batch(**batch_kw)
    (v_mx, g_mx), (v_pt, g_pt) = _mlx(cfg, batch), _torch(cfg, batch)
    v_np, _ = _np_loss(cfg, batch)
    assert abs(v_mx - v_pt) < 1e-6 and v_mx == pytest.approx(v_np, rel=1e-6)
    np.testing.assert_allclose(g_mx, g_pt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_mx, expected_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(g_mx).sum() > 0
    zero = expected_grad == 0  # clipped, capped and masked tokens: exactly zero
    assert (g_mx[zero] == 0).all() and (g_pt[zero] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_matches_finite_differences(loss_type):
    """Every option at once (delta, KL, off-policy) against central differences in float64."""
    cfg = _cfg(loss_type=loss_type, beta=0.1, delta=1.4)
    batch = _batch(lr=LR, ref_per_token_logps=LOGP + D_REF)
    _, g_mx = _mlx(cfg, batch)
    h, fd = 1e-6, np.zeros_like(LOGP)
    for idx in np.ndindex(LOGP.shape):
        step = np.zeros_like(LOGP)
        step[idx] = h
        fd[idx] = (_np_loss(cfg, batch, LOGP + step)[0]
                   - _np_loss(cfg, batch, LOGP - step)[0]) / (2 * h)
    np.testing.assert_allclose(g_mx, fd, rtol=1e-4, atol=1e-6)


# -- config ---------------------------------------------------------------------------------------

def test_preset_defaults():
    g, dr, dapo, gspo = (c(data="x", reward=["r"]) for c in
                         (GRPOConfig, DrGRPOConfig, DAPOConfig, GSPOConfig))
    assert (g.loss_type, g.scale_rewards, g.beta, g.epsilon, g.effective_epsilon_high,
            g.importance_sampling_level) == ("grpo", "group", 0.04, 0.2, 0.2, "token")
    assert (dr.loss_type, dr.scale_rewards, dr.beta) == ("dr_grpo", "none", 0.0)
    assert (dapo.loss_type, dapo.epsilon, dapo.effective_epsilon_high, dapo.beta,
            dapo.mask_truncated_completions, dapo.dynamic_sampling, dapo.overlong_buffer_tokens) == \
        ("dapo", 0.2, 0.28, 0.0, True, True, 51)
    assert g.overlong_buffer_tokens == 0
    assert (gspo.importance_sampling_level, gspo.loss_type, gspo.epsilon,
            gspo.effective_epsilon_high, gspo.beta) == ("sequence", "grpo", 3e-4, 4e-4, 0.0)
    for cfg in (g, dr, dapo, gspo):
        cfg.validate()
    assert g.needs_reference and not dapo.needs_reference and g.generation_batch_size == 32


@pytest.mark.parametrize("kw,flag", [
    ({"num_generations": 1}, "--num-generations=1"), ({"prompts_per_step": 0}, "--prompts-per"),
    ({"num_iterations": 0}, "--num-iterations"), ({"temperature": 0.0}, "--temperature"),
    ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"min_p": 1.0}, "--min-p"),
    ({"top_k": -1}, "--top-k"), ({"epsilon": 0.0}, "--epsilon=0.0"),
    ({"epsilon_high": 0.1}, "--epsilon-high"), ({"delta": 1.1}, "--delta"),
    ({"beta": -1.0}, "--beta"), ({"reward": []}, "--reward=[]: needs at least one"),
    ({"reward_weights": ["1", "2"]}, "--reward-weights"), ({"reward_weights": ["x"]}, "numbers"),
    ({"overlong_buffer": L_MAX}, "--overlong-buffer"),
    ({"grad_accumulation_steps": 2}, "generation batch"), ({"packing": True}, "--packing"),
    ({"multi_objective_aggregation": "normalize_then_sum", "scale_rewards": "none"},
     "--scale-rewards"), ({"loss_type": "ppo_clip"}, "--loss-type"),
    ({"max_completion_length": 2048}, "--max-length"),
])
def test_validation_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag.replace("[", r"\[").replace("]", r"\]")):
        _cfg(**kw)


def test_cli_flags():
    cfg = build_config(GRPOConfig, ["--data", "x", "--reward", "math_answer", "xml_tags",
                                    "--reward-weights", "1", "0.5", "--stop", "</answer>",
                                    "--epsilon-high", "0.28"], "grpo")
    assert cfg.reward_weight_values() == [1.0, 0.5] and cfg.stop == ["</answer>"]
    assert cfg.effective_epsilon_high == 0.28
    # DAPO's buffer follows the completion length (the paper's 0.2 ratio) unless given
    short = build_config(DAPOConfig, ["--data", "x", "--reward", "r", "--max-completion-length",
                                      "32"], "dapo")
    assert short.overlong_buffer_tokens == 6
    with pytest.raises(ConfigError, match="--overlong-buffer=40"):
        build_config(DAPOConfig, ["--data", "x", "--reward", "r", "--max-completion-length",
                                  "32", "--overlong-buffer", "40"], "dapo")
    with pytest.raises(ConfigError, match="--overlong-buffer=-2"):
        build_config(DAPOConfig, ["--data", "x", "--reward", "r", "--overlong-buffer", "-2"],
                     "dapo")


def test_config_and_math_import_no_framework():
    code = ("import sys, algorithms.rl.config, algorithms.rl.advantages, "
            "algorithms.rl.policy_loss; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
