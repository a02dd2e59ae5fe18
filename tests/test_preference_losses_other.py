"""CPO / SimPO / AlphaPO, ORPO and KTO losses against values computed by hand with ``math``
(docs/ALGORITHMS.md sections 4-6), and their configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_preference_losses import LOGPS, MASK, NLL_CHOSEN, logsig, mean, pairs, sig

from algorithms.config import ConfigError
from algorithms.ops import NumpyOps
from algorithms.preference import cpo, kto, orpo

# Same paired batch as the DPO tests. Sums: chosen -1.5, -3.5; rejected -4.0, -2.5.
# Token means: chosen -0.75, -7/6; rejected -4/3, -1.25.
SUM_C, SUM_R = [-1.5, -3.5], [-4.0, -2.5]
AVG_C, AVG_R = [-0.75, -3.5 / 3], [-4.0 / 3, -1.25]
PAIRED = {"loss_mask": MASK}


def _cpo(cls=cpo.CPOConfig, **kw):
    c = cls(data="x", **kw)
    c.validate()
    return cpo.make_loss(c)(NumpyOps(), LOGPS, PAIRED)


def test_cpo_sigmoid_with_label_smoothing_and_nll():
    loss, m = _cpo(beta=0.5, label_smoothing=0.1)
    pref = pairs(lambda c, r: -0.9 * logsig(0.5 * (c - r)) - 0.1 * logsig(-0.5 * (c - r)),
                 SUM_C, SUM_R)
    assert loss == pytest.approx(pref + 1.0 * NLL_CHOSEN, rel=1e-12)
    assert m["loss/sigmoid"] == pytest.approx(pref)
    assert m["loss/nll"] == pytest.approx(NLL_CHOSEN)
    assert m["rewards/chosen"] == pytest.approx(0.5 * mean(SUM_C))
    assert m["rewards/accuracy"] == 0.5  # -1.5 > -4.0; -3.5 < -2.5


def test_cpo_hinge_sums_and_ipo_averages():
    loss, _ = _cpo(loss_type="hinge", beta=0.5, cpo_alpha=0.0)
    assert loss == pytest.approx(pairs(lambda c, r: max(0.0, 1 - 0.5 * (c - r)), SUM_C, SUM_R))
    loss, _ = _cpo(loss_type="ipo", beta=0.5, cpo_alpha=0.0)
    assert loss == pytest.approx(pairs(lambda c, r: (c - r - 1.0) ** 2, AVG_C, AVG_R))


def test_cpo_simpo_keeps_nll():
    # TRL's pitfall: CPOConfig(loss_type=simpo) keeps cpo_alpha=1 ("CPO-SimPO").
    loss, _ = _cpo(loss_type="simpo", beta=2.0)
    pref = pairs(lambda c, r: -logsig(2.0 * (c - r) - 0.5), AVG_C, AVG_R)
    assert loss == pytest.approx(pref + NLL_CHOSEN, rel=1e-12)


def test_simpo_defaults_are_pure_simpo():
    loss, m = _cpo(cpo.SimPOConfig)
    pref = pairs(lambda c, r: -logsig(2.5 * c - 2.5 * r - 1.375), AVG_C, AVG_R)
    assert loss == pytest.approx(pref, rel=1e-12)  # no NLL term
    assert m["loss/simpo"] == pytest.approx(pref)


def test_alphapo():
    def shape(p):
        return (1 - math.exp(p) ** -0.5) / 0.5  # (1 - p^-alpha) / alpha, p = exp(avg logp)

    loss, m = _cpo(cpo.SimPOConfig, alpha=0.5)
    want = pairs(lambda c, r: -logsig(2.5 * (shape(c) - shape(r)) - 1.375), AVG_C, AVG_R)
    assert loss == pytest.approx(want, rel=1e-12)
    assert m["rewards/chosen"] == pytest.approx(2.5 * mean(map(shape, AVG_C)))


def test_simpo_beta_to_zero_with_zero_gamma():
    loss, _ = _cpo(cpo.SimPOConfig, beta=1e-9, simpo_gamma=0.0)
    assert loss == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.parametrize(("cls", "kw", "flag"), [
    (cpo.CPOConfig, {"loss_type": "hinge", "label_smoothing": 0.1}, "--label-smoothing"),
    (cpo.CPOConfig, {"loss_type": "dpo"}, "--loss-type"),
    (cpo.CPOConfig, {"cpo_alpha": -1.0}, "--cpo-alpha"),
    (cpo.SimPOConfig, {"beta": 0.0}, "--beta"),
    (orpo.ORPOConfig, {"beta": -0.1}, "--beta"),
    (kto.KTOConfig, {"undesirable_weight": -1.0}, "--undesirable-weight"),
    (kto.KTOConfig, {"loss_type": "sigmoid"}, "--loss-type"),
])
def test_configs_reject(cls, kw, flag):
    with pytest.raises(ConfigError, match=flag):
        cls(data="x", **kw).validate()


def test_config_defaults():
    c = cpo.CPOConfig(data="x")
    assert (c.loss_type, c.beta, c.cpo_alpha, c.simpo_gamma, c.alpha) == ("sigmoid", 0.1, 1.0,
                                                                          0.5, 0.0)
    s = cpo.SimPOConfig(data="x")
    assert (s.beta, s.simpo_gamma, s.cpo_alpha) == (2.5, 1.375, 0.0)
    o = orpo.ORPOConfig(data="x")
    assert (o.beta, o.nll_include_prompt) == (0.1, False)
    k = kto.KTOConfig(data="x")
    assert (k.beta, k.desirable_weight, k.undesirable_weight, k.loss_type) == (0.1, 1, 1, "kto")


# ORPO ------------------------------------------------------------------------------------------

def _log_odds_ratio(pc, pr):
    """log(odds(P_c) / odds(P_r)) with odds = p / (1 - p), p = exp(mean logp): the paper's form."""
    def odds(lp):
        return math.exp(lp) / (1 - math.exp(lp))

    return math.log(odds(pc) / odds(pr))


def test_orpo_by_hand():
    c = orpo.ORPOConfig(data="x", beta=0.25)
    loss, m = orpo.make_loss(c)(NumpyOps(), LOGPS, PAIRED)
    ratio = pairs(lambda a, b: logsig(_log_odds_ratio(a, b)), AVG_C, AVG_R)
    assert loss == pytest.approx(NLL_CHOSEN - 0.25 * ratio, rel=1e-12)
    assert m["loss/or"] == pytest.approx(-ratio)
    assert m["log_odds_chosen"] == pytest.approx(pairs(_log_odds_ratio, AVG_C, AVG_R))
    assert m["rewards/chosen"] == pytest.approx(0.25 * mean(AVG_C))


def test_orpo_log1mexp_is_stable_near_zero():
    # Mean log-probs -1e-4 (chosen) and -2.0 (rejected): log(1 - e^-1e-4) needs the expm1 branch.
    lp = np.array([[-1e-4], [-2.0]])
    loss, _ = orpo.orpo_loss(NumpyOps(), lp, {"loss_mask": np.ones((2, 1))}, beta=1.0)
    want = 1e-4 - logsig(-1e-4 + 2.0 - (math.log(-math.expm1(-1e-4)) - math.log1p(-math.exp(-2))))
    assert loss == pytest.approx(want, rel=1e-9)


def test_orpo_nll_include_prompt_uses_nll_mask():
    # The data layer marks the prompt too: chosen row 0 gets its third token (-7.0) in the NLL.
    nll_mask = MASK.copy()
    nll_mask[0, 2] = 1
    c = orpo.ORPOConfig(data="x", beta=0.25, nll_include_prompt=True)
    loss, m = orpo.make_loss(c)(NumpyOps(), LOGPS, {"loss_mask": MASK, "nll_loss_mask": nll_mask})
    ratio = pairs(lambda a, b: logsig(_log_odds_ratio(a, b)), AVG_C, AVG_R)
    assert m["loss/nll"] == pytest.approx((5.0 + 7.0) / 6)
    assert loss == pytest.approx((5.0 + 7.0) / 6 - 0.25 * ratio, rel=1e-12)
    with pytest.raises(KeyError, match="nll_loss_mask"):
        orpo.make_loss(c)(NumpyOps(), LOGPS, PAIRED)


def test_orpo_all_masked_row_is_finite():
    mask = MASK.copy()
    mask[0] = 0
    loss, m = orpo.orpo_loss(NumpyOps(), LOGPS, {"loss_mask": mask}, beta=0.1)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())


# KTO -------------------------------------------------------------------------------------------

KTO_LOGPS = np.array([[-1.0, -1.0], [-2.0, -0.5], [-0.5, -0.5], [-3.0, -4.0]])
KTO_REF = np.array([[-1.5, -1.0], [-1.0, -1.0], [-1.0, -0.5], [-2.0, -5.0]])
KTO_MASK = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
LABEL = np.array([1.0, 0.0, 1.0, 0.0])
# r = logp - ref: (-2 + 2.5, -2.5 + 2, -1 + 1.5, -3 + 2) = (0.5, -0.5, 0.5, -1.0)
R = [0.5, -0.5, 0.5, -1.0]
KL_LOGPS = np.array([[-1.0], [-2.0], [-1.0], [-1.0]])


def kto_batch(ref_kl, **extra):
    return {"loss_mask": KTO_MASK, "ref_per_token_logps": KTO_REF, "label": LABEL,
            "kl_per_token_logps": KL_LOGPS, "ref_kl_per_token_logps": np.full((4, 1), ref_kl),
            "kl_loss_mask": np.ones((4, 1)), **extra}


def _kto_want(b, z, wd=1.0, wu=1.0):
    return mean(wd * (1 - sig(b * (r - z))) if y else wu * (1 - sig(b * (z - r)))
                for r, y in zip(R, LABEL))


def _kto(ref_kl=-1.5, **kw):
    c = kto.KTOConfig(data="x", **kw)
    c.validate()
    return kto.make_loss(c)(NumpyOps(), KTO_LOGPS, kto_batch(ref_kl))


def test_kto_both_labels_and_kl():
    # KL pairs: logp (-1, -2, -1, -1) - ref -1.5 = (0.5, -0.5, 0.5, 0.5): z = 0.25.
    loss, m = _kto(beta=0.5)
    assert loss == pytest.approx(_kto_want(0.5, 0.25), rel=1e-12)
    assert m["kl"] == pytest.approx(0.25)
    assert m["rewards/chosen"] == pytest.approx(0.5 * 0.5)
    assert m["rewards/rejected"] == pytest.approx(0.5 * -0.75)
    assert m["logps/chosen"] == pytest.approx(-1.5)  # rows 0, 2: -2, -1
    assert m["logps/rejected"] == pytest.approx(-2.75)  # rows 1, 3: -2.5, -3


def test_kto_kl_is_clamped_at_zero():
    # ref -0.5: KL pairs (-0.5, -1.5, -0.5, -0.5), mean -0.75 -> z = 0.
    loss, m = _kto(ref_kl=-0.5, beta=0.5)
    assert m["kl"] == 0.0
    assert loss == pytest.approx(_kto_want(0.5, 0.0), rel=1e-12)


def test_kto_weights():
    loss, _ = _kto(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    assert loss == pytest.approx(_kto_want(0.5, 0.25, 1.0, 1.5), rel=1e-12)


def test_kto_apo_zero_unpaired_needs_no_kl():
    c = kto.KTOConfig(data="x", beta=0.5, loss_type="apo_zero_unpaired")
    b = {"loss_mask": KTO_MASK, "ref_per_token_logps": KTO_REF, "label": LABEL}
    loss, m = kto.make_loss(c)(NumpyOps(), KTO_LOGPS, b)
    want = mean((1 - sig(0.5 * r)) if y else sig(0.5 * r) for r, y in zip(R, LABEL))
    assert loss == pytest.approx(want, rel=1e-12)
    assert "kl" not in m and not c.needs_kl_batch


def test_kto_beta_to_zero():
    assert _kto(beta=1e-9)[0] == pytest.approx(0.5, abs=1e-7)


def test_kto_kl_gets_no_gradient():
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps

    b = {k: torch.tensor(v, dtype=torch.float32) for k, v in kto_batch(-1.5).items()}
    b["kl_per_token_logps"].requires_grad_(True)
    lp = torch.tensor(KTO_LOGPS, dtype=torch.float32, requires_grad=True)
    loss, _ = kto.kto_loss(TorchOps(), lp, b, beta=0.5)
    loss.backward()
    assert b["kl_per_token_logps"].grad is None
    assert lp.grad.abs().sum() > 0
