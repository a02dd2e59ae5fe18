"""Online DPO, XPO and Nash-MD losses by hand (NumpyOps, float64), their gradients through MLX
and torch autograd, the ranking of pairs (ties, unscorable completions), and the pair
micro-batching: a pair never splits, and the micro-batches of a step sum to its loss
(regression: rows sorted by length alone, as the GRPO batches are, put a chosen completion
beside another prompt's rejected one)."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.online_preference.config import NashMDConfig, OnlineDPOConfig, XPOConfig
from algorithms.online_preference.losses import make_nash_md_loss, make_pair_loss
from algorithms.online_preference.pairs import PairBatch, preference, rank
from algorithms.ops import NumpyOps
from algorithms.rl.batches import RolloutBatch
from algorithms.rl.data import PromptExample
from algorithms.rl.rollouts import Rollouts
from algorithms.rl.sampling import Completion

BETA = 0.1
# two pairs, rows: chosen 0, chosen 1, rejected 0, rejected 1; 3 token slots
LOGP = np.array([[-1.0, -0.5, -0.2], [-2.0, -1.0, 0.0], [-0.3, -0.7, -1.1], [-1.5, -0.5, -0.5]])
REF = np.array([[-1.2, -0.6, -0.1], [-1.0, -1.5, 0.0], [-0.4, -0.4, -1.0], [-1.0, -1.0, -0.2]])
MASK = np.array([[1.0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
SEQ, SEQ_REF = (LOGP * MASK).sum(1), (REF * MASK).sum(1)  # -1.7 -3 -2.1 -2.5 | -1.9 -2.5 -1.8 -2.2
RHO = SEQ - SEQ_REF                                          # 0.2 -0.5 -0.3 -0.3
H = RHO[:2] - RHO[2:]                                        # 0.5 -0.2


def _cfg(cls, **kw):
    cfg = cls(**{"data": "x", "reward": ["r"], "beta": BETA, **kw})
    cfg.validate()
    return cfg


def _batch(**extra):
    return {"loss_mask": MASK, "ref_per_token_logps": REF, "micro_fraction": np.float64(0.5),
            **extra}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_by_hand(loss_type):
    loss, metrics = make_pair_loss(_cfg(OnlineDPOConfig, loss_type=loss_type))(
        NumpyOps(), LOGP, _batch())
    per_pair = -_log_sigmoid(BETA * H) if loss_type == "sigmoid" else (H - 1 / (2 * BETA)) ** 2
    assert float(loss) == pytest.approx(0.5 * per_pair.mean(), rel=1e-12)
    assert float(metrics["rewards/chosen"]) == pytest.approx(BETA * RHO[:2].mean())
    assert float(metrics["rewards/margin"]) == pytest.approx(BETA * H.mean())
    assert float(metrics["rewards/accuracy"]) == 0.5
    assert float(metrics["kl"]) == pytest.approx(RHO.mean())
    assert float(metrics["logps/rejected"]) == pytest.approx(SEQ[2:].mean())


def test_unscored_pairs_carry_no_preference():
    loss, _ = make_pair_loss(_cfg(OnlineDPOConfig))(
        NumpyOps(), LOGP, _batch(pair_weight=np.array([1.0, 0.0])))
    assert float(loss) == pytest.approx(0.5 * -_log_sigmoid(BETA * H[0]) / 2, rel=1e-12)


def test_xpo_adds_the_exploration_term():
    # the reference's completions are row 1 (chosen in pair 1) and row 2 (rejected in pair 0)
    from_second = np.array([0.0, 1.0, 1.0, 0.0])
    loss, metrics = make_pair_loss(_cfg(XPOConfig, alpha=0.3))(
        NumpyOps(), LOGP, _batch(from_second=from_second))
    explore = 0.3 * (SEQ[1] + SEQ[2]) / 2
    assert float(loss) == pytest.approx(0.5 * (-_log_sigmoid(BETA * H).mean() + explore),
                                        rel=1e-12)
    assert float(metrics["loss/xpo"]) == pytest.approx(explore)


P = np.array([0.8, 0.3, 0.5, 0.6])


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_nash_md_by_hand(level):
    cfg = _cfg(NashMDConfig, kl_level=level)
    loss, metrics = make_nash_md_loss(cfg)(NumpyOps(), LOGP, _batch(preference=P))
    kl = RHO * SEQ if level == "sequence" else ((LOGP - REF) * LOGP * MASK).sum(1)
    want = (BETA * kl - (P - 0.5) * SEQ).mean()
    assert float(loss) == pytest.approx(0.5 * want, rel=1e-12)
    assert float(metrics["loss/score"]) == pytest.approx(((P - 0.5) * SEQ).mean())
    assert float(metrics["preference/mean"]) == pytest.approx(P.mean())


GRAD_CASES = {
    # d/dlogp_t of -log sigma(beta h): -beta sigma(-beta h) on chosen tokens, + on rejected
    "online_dpo": (OnlineDPOConfig, {}, {}, lambda: np.concatenate(
        [-BETA / (1 + np.exp(BETA * H)), BETA / (1 + np.exp(BETA * H))])[:, None] * MASK / 4),
    "ipo": (OnlineDPOConfig, {"loss_type": "ipo"}, {}, lambda: np.concatenate(
        [2 * (H - 5), -2 * (H - 5)])[:, None] * MASK / 4),
    # sequence REINFORCE: -(P - 1/2 - beta rho) on every token of the row
    "nash_md": (NashMDConfig, {}, {"preference": P},
                lambda: (BETA * RHO - (P - 0.5))[:, None] * MASK / 8),
    "nash_md_token": (NashMDConfig, {"kl_level": "token"}, {"preference": P},
                      lambda: (BETA * (LOGP - REF) - (P - 0.5)[:, None]) * MASK / 8),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_mlx_torch_and_hand(name):
    """MLX and torch autograd against the derivative by hand: a mean over 2 pairs (4 Nash-MD
    rows) times micro_fraction 1/2."""
    mx = pytest.importorskip("mlx.core")
    torch = pytest.importorskip("torch")
    from cuda_ft.ops import TorchOps
    from mlx_ft.ops import MLXOps

    cls, kw, extra, hand = GRAD_CASES[name]
    cfg = _cfg(cls, **kw)
    loss_fn = (make_nash_md_loss if cls is NashMDConfig else make_pair_loss)(cfg)
    batch = _batch(**extra)
    mb = {k: mx.array(np.asarray(v, np.float32)) for k, v in batch.items()}
    _, g_mx = mx.value_and_grad(lambda x: loss_fn(MLXOps(), x, mb)[0])(
        mx.array(LOGP.astype(np.float32)))
    x = torch.tensor(LOGP, dtype=torch.float32, requires_grad=True)
    loss_fn(TorchOps(), x, {k: torch.tensor(np.asarray(v), dtype=torch.float32)
                            for k, v in batch.items()})[0].backward()
    np.testing.assert_allclose(np.array(g_mx), hand(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x.grad.numpy(), hand(), rtol=1e-5, atol=1e-7)
    assert np.abs(hand()).sum() > 0


def test_ranking_ties_go_to_the_first_and_nan_is_unscored():
    total = np.array([1.0, 0.5, 0.2, 0.2, np.nan, 3.0, -1.0, 2.0])
    first_wins, scored = rank(total)
    assert first_wins.tolist() == [True, True, True, False]   # 1 > .5; tie; NaN; -1 < 2
    assert scored.tolist() == [True, True, False, True]
    np.testing.assert_allclose(preference(total), [1 / (1 + np.exp(-0.5)), 0.5, 0.5,
                                                   1 / (1 + np.exp(3.0))])


# -- pair micro-batching ---------------------------------------------------------------------

def _rollouts():
    """Six pairs whose two completions differ a lot in length (1 vs 9 tokens, alternating),
    with prompts of different lengths: sorted by row length, chosen and rejected rows drift
    apart; rewards make the longer completion win in odd pairs only."""
    examples, completions, total = [], [], []
    for k in range(6):
        prompt = PromptExample(f"f:{k}", f"p{k}", list(range(3, 5 + k)), {})
        short, long_ = [20 + k], list(range(40, 49))
        first, second = (short, long_) if k % 2 else (long_, short)
        for ids, reward in ((first, float(k % 3)), (second, 1.0)):
            examples.append(prompt)
            completions.append(Completion(ids, "", "eos"))
            total.append(reward)
    total = np.array(total)
    return Rollouts(examples, completions, {"r": total}, {"r": 1.0}, total, {})


def _logps(arrays):
    """Synthetic per-token log-probs that depend on the target token only (so a row scores the
    same in any batch layout)."""
    policy = -0.1 * (arrays["targets"] % 13) - 0.05
    return policy * arrays["loss_mask"], -0.08 * (arrays["targets"] % 11) * arrays["loss_mask"]


def test_pairs_never_split_and_micro_batches_sum_to_the_step():
    rollouts = _rollouts()
    batch = PairBatch(rollouts, pad_id=0)
    loss_fn = make_pair_loss(_cfg(XPOConfig, alpha=0.05))
    pairs = list(range(len(batch)))

    def step_loss(batch_size):
        total, seen = 0.0, []
        for rows, arrays in batch.micro_batches(pairs, batch_size):
            n = len(rows) // 2
            for j in range(n):
                chosen, rejected = rows[j], rows[n + j]
                assert chosen // 2 == rejected // 2                          # one pair
                assert rollouts.examples[chosen] is rollouts.examples[rejected]
                assert rollouts.total[chosen] >= rollouts.total[rejected]    # ranked
                np.testing.assert_array_equal(                              # same prompt ids
                    arrays["input_ids"][j, :2], arrays["input_ids"][n + j, :2])
                seen.append(chosen // 2)
            logp, ref = _logps(arrays)
            loss, _ = loss_fn(NumpyOps(), logp, {**arrays, "ref_per_token_logps": ref})
            total += float(loss)
        assert sorted(seen) == pairs
        return total

    whole = step_loss(6)
    for size in (1, 2, 4):
        assert step_loss(size) == pytest.approx(whole, rel=1e-6)  # float32 shares
    # the regression this layout prevents: GRPO's row-level micro-batches do not put a pair's
    # rows at (j, n + j), so a pair loss over them would compare completions of two prompts
    plain = RolloutBatch(rollouts, mask_truncated=False, temperature=1.0, pad_id=0)
    layouts = [rows for rows, _ in plain.micro_batches(list(range(12)), 4)]
    assert any(rows[j] // 2 != rows[len(rows) // 2 + j] // 2
               for rows in layouts for j in range(len(rows) // 2))


def test_nash_md_layout_keeps_the_policy_rows_and_their_preference():
    rollouts = _rollouts()
    batch = PairBatch(rollouts, pad_id=0, layout="policy")
    for rows, arrays in batch.micro_batches([0, 3, 5], 2):
        assert all(r % 2 == 0 for r in rows)
        want = [batch.preference[r // 2] for r in rows]
        np.testing.assert_allclose(arrays["preference"], want, rtol=1e-6)
