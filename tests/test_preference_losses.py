"""DPO-family losses against values computed by hand from a handful of log-probs.

Expected values are written from docs/ALGORITHMS.md section 3 with plain ``math`` over the
sequence-level numbers below (summed by hand from the token tables), not through the
implementation's code path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from algorithms.config import ConfigError
from algorithms.ops import NumpyOps
from algorithms.preference.dpo import LOSS_TYPES, DPOConfig, make_loss

# Rows 0-1 chosen, rows 2-3 rejected; pair i = rows (i, 2 + i). Masked positions hold junk values
# that must be ignored.
LOGPS = np.array([[-1.0, -0.5, -7.0], [-2.0, -1.0, -0.5],
                  [-2.0, -1.0, -1.0], [-1.0, -1.5, -9.0]])
REF = np.array([[-1.5, -0.5, -3.0], [-1.0, -1.0, -1.0],
                [-1.0, -1.0, -0.5], [-2.0, -1.75, -1.0]])
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# Sums by hand: policy chosen -1.5, -3.5; rejected -4.0, -2.5. Reference chosen -2.0, -3.0;
# rejected -2.5, -3.75. Lengths chosen 2, 3; rejected 3, 2.
LOGP_C, LOGP_R, REF_C, REF_R = [-1.5, -3.5], [-4.0, -2.5], [-2.0, -3.0], [-2.5, -3.75]
RHO_C, RHO_R = [0.5, -0.5], [-1.5, 1.25]
LEN_C, LEN_R = [2, 3], [3, 2]
NLL_CHOSEN = (1.0 + 0.5 + 2.0 + 1.0 + 0.5) / 5  # = 1.0
BETA, EPS = 0.5, 0.1


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def pairs(f, *cols):
    return mean(f(*args) for args in zip(*cols))


def cfg(**kw) -> DPOConfig:
    kw.setdefault("beta", BETA)
    kw.setdefault("loss_type", ["sigmoid"])
    c = DPOConfig(data="x", **kw)
    c.validate()
    return c


def batch(**extra):
    return {"loss_mask": MASK, "ref_per_token_logps": REF, **extra}


def run(c, lp=LOGPS, b=None):
    return make_loss(c)(NumpyOps(), lp, batch() if b is None else b)


def smoothed(z, e):
    return -(1 - e) * logsig(z) - e * logsig(-z)


def expected(kind, b=BETA, e=EPS, rc=RHO_C, rr=RHO_R):
    """Each loss type's table row in docs/ALGORITHMS.md section 3, with s = rho (reverse_kl)."""
    h = 1 / (2 * b)
    table = {
        "sigmoid": lambda c, r: -logsig(b * (c - r)),
        "hinge": lambda c, r: max(0.0, 1 - b * (c - r)),
        "robust": lambda c, r: (-(1 - e) * logsig(b * (c - r)) + e * logsig(-b * (c - r)))
        / (1 - 2 * e),
        "exo_pair": lambda c, r: sig(b * (c - r)) * (logsig(b * (c - r)) - math.log(1 - e))
        + sig(-b * (c - r)) * (logsig(-b * (c - r)) - math.log(e)),
        "nca_pair": lambda c, r: -logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r),
        "bco_pair": lambda c, r: -logsig(b * c) - logsig(-b * r),
        "sppo_hard": lambda c, r: (c - h) ** 2 + (r + h) ** 2,
        "apo_zero": lambda c, r: (1 - sig(b * c)) + sig(b * r),
        "apo_down": lambda c, r: sig(b * c) + (1 - sig(b * (c - r))),
        "discopop": lambda c, r: (1 - sig(b * (c - r) / 0.05)) * -logsig(b * (c - r))
        + sig(b * (c - r) / 0.05) * math.exp(-b * (c - r)),
    }
    if kind in table:
        return pairs(table[kind], rc, rr)
    if kind == "ipo":
        return pairs(lambda c, r, lc, lr: (c / lc - r / lr - h) ** 2, rc, rr, LEN_C, LEN_R)
    if kind == "sigmoid_norm":
        return pairs(lambda c, r, lc, lr: -logsig(b * (c / lc - r / lr)), rc, rr, LEN_C, LEN_R)
    if kind == "aot":
        # sort(logp_c - logp_r) = sort(2.5, -1.0); sort(ref_c - ref_r) = sort(0.5, 0.75)
        return mean(smoothed(b * d, e) for d in (-1.0 - 0.5, 2.5 - 0.75))
    if kind == "aot_unpaired":
        # sort(rho_c) = (-0.5, 0.5); sort(rho_r) = (-1.5, 1.25)
        return mean(smoothed(b * d, e) for d in (-0.5 + 1.5, 0.5 - 1.25))
    if kind == "sft":
        return NLL_CHOSEN
    raise KeyError(kind)


def _eps_for(kind):
    return EPS if kind in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type_by_hand(kind):
    loss, metrics = run(cfg(loss_type=[kind], label_smoothing=_eps_for(kind)))
    assert loss == pytest.approx(expected(kind), rel=1e-12)
    assert metrics[f"loss/{kind}"] == pytest.approx(expected(kind), rel=1e-12)


def test_pair_metrics_by_hand():
    _, m = run(cfg())
    assert m["rewards/chosen"] == pytest.approx(BETA * mean(RHO_C))
    assert m["rewards/rejected"] == pytest.approx(BETA * mean(RHO_R))
    assert m["rewards/margin"] == pytest.approx(BETA * (mean(RHO_C) - mean(RHO_R)))
    assert m["rewards/accuracy"] == 0.5  # pair 0: 0.5 > -1.5; pair 1: -0.5 < 1.25
    assert m["logps/chosen"] == pytest.approx(mean(LOGP_C))
    assert m["logps/rejected"] == pytest.approx(mean(LOGP_R))


def test_label_smoothing_zero_robust_and_aot_are_sigmoid_forms():
    loss, _ = run(cfg(loss_type=["robust"]))
    assert loss == pytest.approx(expected("sigmoid"), rel=1e-12)
    loss, _ = run(cfg(loss_type=["aot"]))
    assert loss == pytest.approx(expected("aot", e=0.0), rel=1e-12)


@pytest.mark.parametrize(("kind", "limit"), [
    ("sigmoid", math.log(2)), ("hinge", 1.0), ("robust", math.log(2)),
    ("nca_pair", 2 * math.log(2)), ("bco_pair", 2 * math.log(2)), ("apo_zero", 1.0),
    ("apo_down", 1.0), ("discopop", 0.5 * math.log(2) + 0.5), ("aot", math.log(2)),
    ("exo_pair", -math.log(2) - 0.5 * math.log(EPS * (1 - EPS))),
])
def test_beta_to_zero(kind, limit):
    # As beta -> 0 every pair's argument -> 0: sigma = 1/2, log sigma = -log 2.
    loss, _ = run(cfg(loss_type=[kind], beta=1e-9, label_smoothing=_eps_for(kind)))
    assert loss == pytest.approx(limit, abs=1e-7)


def test_mpo_weights_combine_two_losses():
    loss, m = run(cfg(loss_type=["sigmoid", "sft"], loss_weights=["0.8", "0.2"]))
    assert loss == pytest.approx(0.8 * expected("sigmoid") + 0.2 * NLL_CHOSEN, rel=1e-12)
    assert m["loss/sft"] == pytest.approx(NLL_CHOSEN)
    # Unweighted (RPO) is the plain sum.
    loss, _ = run(cfg(loss_type=["sigmoid", "hinge"]))
    assert loss == pytest.approx(expected("sigmoid") + expected("hinge"), rel=1e-12)


F_SCORES = [  # f'(exp(rho)), 0 at the reference
    ("forward_kl", lambda r: 1.0 - math.exp(-r)),
    ("js_divergence", lambda r: math.log(2.0) + logsig(r)),
    ("alpha_divergence", lambda r: (math.exp((0.5 - 1) * r) - 1.0) / (0.5 - 1)),
]


@pytest.mark.parametrize(("kind", "score"), F_SCORES)
def test_f_divergences(kind, score):
    loss, _ = run(cfg(f_divergence_type=kind))
    want = pairs(lambda c, r: -logsig(BETA * (score(c) - score(r))), RHO_C, RHO_R)
    assert loss == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("kind", "score"), F_SCORES)
def test_f_divergence_scores_are_zero_at_the_reference_under_ipo(kind, score):
    # Regression: the scores lacked the shift that makes them 0 at rho = 0; it cancels in
    # s_c - s_r but not after IPO's division by the lengths (IPO + forward_kl was 6.6e-3 off TRL).
    assert score(0.0) == pytest.approx(0.0, abs=1e-15)
    loss, _ = run(cfg(loss_type=["ipo"], f_divergence_type=kind))
    want = pairs(lambda c, r, lc, lr: (score(c) / lc - score(r) / lr - 1 / (2 * BETA)) ** 2,
                 RHO_C, RHO_R, LEN_C, LEN_R)
    assert loss == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                                  "apo_zero", "apo_down"])
def test_f_divergence_refused_with_losses_on_raw_log_ratios(kind):
    with pytest.raises(ConfigError, match="--f-divergence-type='forward_kl'.*" + kind):
        cfg(loss_type=[kind], f_divergence_type="forward_kl", label_smoothing=_eps_for(kind))
    cfg(loss_type=[kind], label_smoothing=_eps_for(kind))  # reverse_kl stays allowed


def test_alpha_divergence_near_one_is_reverse_kl():
    loss, _ = run(cfg(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0))
    assert loss == pytest.approx(expected("sigmoid"), rel=1e-12)


def test_ld_dpo():
    assert run(cfg(ld_alpha=1.0))[0] == pytest.approx(expected("sigmoid"), rel=1e-12)
    # alpha = 0.5. Pair 0: |y_c| 2, |y_r| 3, shared 2: rejected tail token -1.0 (ref -0.5) counts
    # half: logp_r = -3.5, ref_r = -2.25. Pair 1: |y_c| 3, |y_r| 2: chosen tail -0.5 (ref -1.0):
    # logp_c = -3.25, ref_c = -2.5. rho_c = (0.5, -0.75), rho_r = (-1.25, 1.25).
    loss, m = run(cfg(ld_alpha=0.5))
    assert loss == pytest.approx(expected("sigmoid", rc=[0.5, -0.75], rr=[-1.25, 1.25]),
                                 rel=1e-12)
    assert m["logps/rejected"] == pytest.approx(mean([-3.5, -2.5]))


def test_wpo_weights():
    # log sum_v p_v^2 = -1 on every token: w = exp(mean_t logp_t + 1).
    # chosen means -0.75, -7/6; rejected -4/3, -1.25.
    norm = -np.ones_like(LOGPS)
    loss, m = run(cfg(use_weighting=True), lp={"logps": LOGPS, "log_sum_sq": norm})
    w = [math.exp(0.25 - 1 / 3), math.exp(-1 / 6 - 0.25)]
    terms = [-logsig(BETA * (c - r)) for c, r in zip(RHO_C, RHO_R)]
    assert loss == pytest.approx(mean(wi * t for wi, t in zip(w, terms)), rel=1e-12)
    assert m["wpo/weight"] == pytest.approx(mean(w))


def test_reference_free_uses_zero_reference():
    b = {"loss_mask": MASK}  # no reference log-probs at all
    loss, m = run(cfg(reference_free=True), b=b)
    assert loss == pytest.approx(expected("sigmoid", rc=LOGP_C, rr=LOGP_R), rel=1e-12)
    assert m["rewards/chosen"] == pytest.approx(BETA * mean(LOGP_C))


def test_missing_reference_is_an_error():
    with pytest.raises(KeyError, match="ref_per_token_logps"):
        run(cfg(), b={"loss_mask": MASK})


def test_bco_explicit_running_mean():
    loss, m = run(cfg(loss_type=["bco_pair"]), b=batch(bco_reward_mean=0.3))
    want = pairs(lambda c, r: -logsig(BETA * c - 0.3) - logsig(-(BETA * r - 0.3)), RHO_C, RHO_R)
    assert loss == pytest.approx(want, rel=1e-12)
    assert m["bco/batch_reward_mean"] == pytest.approx(BETA * (mean(RHO_C) + mean(RHO_R)) / 2)


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_all_masked_rows_stay_finite(kind):
    # Chosen row 0 and rejected row 3 have no response tokens: their sequence log-probs are 0.
    mask = MASK.copy()
    mask[0] = 0
    mask[3] = 0
    loss, metrics = run(cfg(loss_type=[kind], label_smoothing=_eps_for(kind), ld_alpha=0.5),
                        b={"loss_mask": mask, "ref_per_token_logps": REF})
    assert np.isfinite(loss)
    assert all(np.isfinite(v) for v in metrics.values())


def test_all_masked_rows_torch_gradient_finite():
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    mask = MASK.copy()
    mask[0] = 0
    c = cfg(loss_type=["ipo", "sigmoid_norm", "sft"], ld_alpha=0.5, use_weighting=True)
    lp = torch.tensor(LOGPS, dtype=torch.float32, requires_grad=True)
    b = {"loss_mask": torch.tensor(mask, dtype=torch.float32),
         "ref_per_token_logps": torch.tensor(REF, dtype=torch.float32)}
    loss, _ = make_loss(c)(TorchOps(), {"logps": lp, "log_sum_sq": -torch.ones(4, 3)}, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert torch.all(lp.grad[0] == 0)  # the masked row gets no gradient


@pytest.mark.parametrize(("kw", "flag"), [
    ({"loss_type": ["sigmoid", "hinge"], "loss_weights": ["1.0"]}, "--loss-weights"),
    ({"loss_weights": ["heavy"]}, "--loss-weights"),
    ({"loss_type": ["dpo"]}, "--loss-type"),
    ({"loss_type": []}, "--loss-type"),
    ({"loss_type": ["sigmoid", "sigmoid"]}, "--loss-type"),
    ({"label_smoothing": 0.1}, "--label-smoothing"),
    ({"loss_type": ["robust"], "label_smoothing": 0.5}, "--label-smoothing"),
    ({"loss_type": ["exo_pair"]}, "--label-smoothing"),
    ({"loss_type": ["apo_zero"], "reference_free": True}, "--reference-free"),
    ({"loss_type": ["aot"], "use_weighting": True}, "--use-weighting"),
    ({"beta": 0.0}, "--beta"),
    ({"ld_alpha": 1.5}, "--ld-alpha"),
    ({"f_divergence_type": "kl"}, "--f-divergence-type"),
    ({"discopop_tau": 0.0}, "--discopop-tau"),
])
def test_config_rejects(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        DPOConfig(data="x", **kw).validate()


def test_config_defaults():
    c = DPOConfig(data="x")
    c.validate()
    assert (c.loss_type, c.beta, c.label_smoothing, c.f_divergence_type) == (
        ["sigmoid"], 0.1, 0.0, "reverse_kl")
    assert (c.f_alpha_divergence_coef, c.discopop_tau, c.ld_alpha) == (0.5, 0.05, 1.0)
    assert c.weights() == [1.0] and c.needs_reference
    assert not DPOConfig(data="x", loss_type=["sft"]).needs_reference
    assert not DPOConfig(data="x", reference_free=True).needs_reference
