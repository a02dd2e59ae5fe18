"""One generation batch without a model: scripted completions, real scorer, DAPO's dynamic
sampling, the no-grad passes and estimate of the prepass, and the micro-batch layout the policy
loss reads."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.rl.batches import RolloutBatch, mini_batches
from algorithms.rl.data import PromptDataset, PromptExample, PromptReport, PromptStream
from algorithms.rl.prepass import prepare_batch
from algorithms.rl.presets import GRPOConfig
from algorithms.rl.rollouts import generate
from algorithms.rl.sampling import Completion
from rewards import RewardScorer


class ScriptedBackend:
    """``sample`` answers each prompt by its text: ``mixed`` prompts get completions 'a', 'b',
    'a', 'b'...; ``flat`` prompts always 'a' (so their group rewards are all equal)."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, params, seed):
        self.calls.append((len(prompts), seed))
        out = []
        for j, ids in enumerate(prompts):
            mixed = ids[0] == 1
            text = "b" if mixed and j % 2 else "a"
            reason = "length" if text == "b" else "eos"
            out.append(Completion([7] * (2 if text == "a" else 3), text, reason))
        return out


def reward_b(prompts, completions, **kw):
    return [1.0 if c == "b" else 0.0 for c in completions]


def _dataset(kinds):
    examples = [PromptExample(f"t.jsonl:{i + 1}", f"{kind}{i}", [1 if kind == "mixed" else 2, 5],
                              {"answer": str(i)}) for i, kind in enumerate(kinds)]
    return PromptDataset(examples, PromptReport("t.jsonl", len(examples), {}, ["answer"], 2, []))


def _cfg(**kw):
    base = {"data": "x", "reward": ["r"], "num_generations": 4, "prompts_per_step": 2,
            "max_completion_length": 3, "seed": 0, "max_sampling_rounds": 3, "batch_size": 3,
            "beta": 0.0}
    cfg = GRPOConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def test_generation_batch_advantages_and_stats():
    stream = PromptStream(_dataset(["mixed", "flat"]), seed=0)
    backend = ScriptedBackend()
    rollouts = generate(_cfg(), backend, stream, RewardScorer([reward_b]), step=0)
    assert len(rollouts) == 8
    batch, stats = prepare_batch(_cfg(), backend, rollouts, pad_id=0)
    advantages = batch.row_values["advantages"]
    mixed = [i for i, e in enumerate(rollouts.examples) if e.prompt.startswith("mixed")]
    flat = [i for i, e in enumerate(rollouts.examples) if e.prompt.startswith("flat")]
    # mixed group rewards 0,1,0,1: mean 0.5, Bessel std sqrt(1/3) -> A = +-0.5 / (0.57735 + 1e-4)
    np.testing.assert_allclose(advantages[mixed], [-0.86588, 0.86588] * 2, rtol=1e-4)
    np.testing.assert_array_equal(advantages[flat], 0.0)
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["reward"] == pytest.approx(2 / 8)
    assert stats["completions/max_length"] == 3
    assert stats["completions/clipped_ratio"] == pytest.approx(2 / 8)


def test_missing_eos_penalty_is_a_reward_column():
    # 'b' completions hit the length limit: reward 1 - 0.5; 'a' ones end on EOS: reward 0
    stream = PromptStream(_dataset(["mixed"]), seed=0)
    cfg = _cfg(prompts_per_step=1, missing_eos_penalty=0.5)
    rollouts = generate(cfg, ScriptedBackend(), stream, RewardScorer([reward_b]), step=0)
    np.testing.assert_allclose(rollouts.rewards["missing_eos_penalty"], [0, -0.5] * 2)
    np.testing.assert_allclose(rollouts.total, [0, 0.5] * 2)
    assert rollouts.weights == {"reward_b": 1.0, "missing_eos_penalty": 1.0}


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    backend = ScriptedBackend()
    stream = PromptStream(_dataset(["flat", "mixed", "flat", "mixed", "mixed"]), seed=0)
    cfg = _cfg(dynamic_sampling=True, max_sampling_rounds=10)
    rollouts = generate(cfg, backend, stream, RewardScorer([reward_b]), step=0)
    assert all(e.prompt.startswith("mixed") for e in rollouts.examples)
    assert len(rollouts) == 8
    stats = rollouts.stats
    assert stats["dynamic_sampling/topped_up_groups"] == 0
    assert stats["dynamic_sampling/sampled_groups"] == sum(n for n, _ in backend.calls) / 4
    assert stats["dynamic_sampling/dropped_groups"] == stats["dynamic_sampling/sampled_groups"] - 2
    # each round asks only for the groups still missing, every completion with its own seed
    assert backend.calls[0][0] == 2 * 4
    seeds = [s for n, row_seeds in backend.calls for s in row_seeds]
    assert all(len(row_seeds) == n for n, row_seeds in backend.calls)
    assert len(set(seeds)) == len(seeds)


def test_dynamic_sampling_stops_at_its_cap_and_tops_up():
    backend = ScriptedBackend()
    stream = PromptStream(_dataset(["flat"] * 6), seed=0)
    cfg = _cfg(dynamic_sampling=True, max_sampling_rounds=3)
    rollouts = generate(cfg, backend, stream, RewardScorer([reward_b]), step=0)
    assert len(backend.calls) == 3  # the cap
    assert rollouts.stats["dynamic_sampling/rounds"] == 3
    assert rollouts.stats["dynamic_sampling/topped_up_groups"] == 2
    assert rollouts.stats["frac_reward_zero_std"] == 1.0
    assert len(rollouts) == 8
    batch, _ = prepare_batch(cfg, backend, rollouts, pad_id=0)
    assert not batch.row_values["advantages"].any()


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_micro_batches_layout(mask_truncated):
    stream = PromptStream(_dataset(["mixed", "mixed"]), seed=0)
    cfg = _cfg(mask_truncated_completions=mask_truncated, temperature=0.7)
    backend = ScriptedBackend()
    rollouts = generate(cfg, backend, stream, RewardScorer([reward_b]), step=0)
    batch, _ = prepare_batch(cfg, backend, rollouts, pad_id=0)
    arrays = [a for _, a in batch.micro_batches(list(range(len(batch))), cfg.batch_size)]
    assert [len(a["input_ids"]) for a in arrays] == [3, 3, 2]
    assert sum(float(a["micro_fraction"]) for a in arrays) == pytest.approx(1.0)
    # completions 'a' are 2 tokens (eos), 'b' 3 tokens (truncated); prompts are 2 tokens
    kept = 4 * 2 + (0 if mask_truncated else 4 * 3)
    assert all(float(a["num_items"]) == kept for a in arrays)
    assert sum(float(a["loss_mask"].sum()) for a in arrays) == kept
    first = arrays[0]  # shortest rows first: a prompt [1, 5] + completion [7, 7]
    np.testing.assert_array_equal(first["input_ids"][0], [1, 5, 7, 7])
    np.testing.assert_array_equal(first["targets"][0], [5, 7, 7, 0])
    np.testing.assert_array_equal(first["loss_mask"][0], [0, 1, 1, 0])
    assert float(first["temperature"]) == pytest.approx(0.7)
    order = np.concatenate([a["advantages"] for a in arrays])
    advantages = batch.row_values["advantages"].astype(np.float32)
    assert sorted(order.tolist()) == sorted(advantages.tolist())


class StatsBackend(ScriptedBackend):
    """Records the no-gradient passes the prepass asks for."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def forward(self, arrays, outputs, reference=False):
        self.passes.append(("reference" if reference else "policy", tuple(outputs)))
        return {name: np.full(arrays["loss_mask"].shape, 0.5, np.float32) for name in outputs}

    def reference_per_token_logps(self, arrays):
        return self.forward(arrays, ("logps",), reference=True)["logps"]


@pytest.mark.parametrize("beta, mu, minis, wanted", [
    (0.0, 1, 1, set()), (0.04, 1, 1, {("reference", ("logps",))}),
    (0.0, 2, 1, {("policy", ("logps",))}), (0.0, 1, 2, {("policy", ("logps",))}),
    (0.04, 2, 1, {("policy", ("logps",)), ("reference", ("logps",))})])
def test_reference_only_with_kl_and_old_logps_only_off_policy(beta, mu, minis, wanted):
    backend = StatsBackend()
    cfg = _cfg(beta=beta, num_iterations=mu, num_mini_batches=minis)
    rollouts = generate(cfg, backend, PromptStream(_dataset(["mixed", "flat"]), seed=0),
                        RewardScorer([reward_b]), step=0)
    batch, _ = prepare_batch(cfg, backend, rollouts, pad_id=0)
    assert set(backend.passes) == wanted
    arrays = batch.collate([0, 1])
    assert ("ref_per_token_logps" in arrays) == (beta > 0)
    assert ("old_per_token_logps" in arrays) == (mu * minis > 1)


def test_ppo_prepass_takes_values_and_the_kl_reward():
    backend = StatsBackend()
    cfg = _cfg(advantage_estimator="gae", num_generations=1, prompts_per_step=2,
               kl_penalty="reward", kl_estimator="k1", beta=0.1, num_iterations=2,
               loss_type="dapo")
    rollouts = generate(cfg, backend, PromptStream(_dataset(["mixed", "flat"]), seed=0),
                        RewardScorer([reward_b]), step=0)
    batch, stats = prepare_batch(cfg, backend, rollouts, pad_id=0)
    assert set(backend.passes) == {("policy", ("logps", "values")), ("reference", ("logps",))}
    arrays = batch.collate([0])
    for key in ("advantages", "returns", "old_values", "old_per_token_logps"):
        assert arrays[key].shape == arrays["input_ids"].shape, key
    assert "ref_per_token_logps" not in arrays  # the KL went into the reward
    # policy and reference log-probs are equal here: KL 0; values 0.5 everywhere
    assert stats["kl"] == 0.0 and stats["values/mean"] == pytest.approx(0.5)
    mask = arrays["loss_mask"] > 0
    assert (arrays["old_values"][mask] == 0.5).all() and (arrays["old_values"][~mask] == 0).all()


def test_top_entropy_quantile_adds_a_mask_from_the_rollout_entropy():
    backend = StatsBackend()
    cfg = _cfg(top_entropy_quantile=0.2)
    rollouts = generate(cfg, backend, PromptStream(_dataset(["mixed", "flat"]), seed=0),
                        RewardScorer([reward_b]), step=0)
    batch, stats = prepare_batch(cfg, backend, rollouts, pad_id=0)
    assert backend.passes == [("policy", ("entropy",))] * 3
    assert "entropy_mask" in batch.collate([0]) and stats["entropy/threshold"] == 0.5


def test_mini_batches_are_seeded_shuffles_of_every_row():
    cfg = _cfg(num_iterations=2, num_mini_batches=3)
    steps = mini_batches(8, cfg, generation_step=4)
    assert len(steps) == 6 and [len(s) for s in steps] == [3, 3, 2] * 2
    for epoch in (steps[:3], steps[3:]):
        assert sorted(i for s in epoch for i in s) == list(range(8))
    assert steps[:3] != steps[3:] and steps == mini_batches(8, cfg, generation_step=4)
    assert mini_batches(8, _cfg(num_iterations=2), 0) == [list(range(8))] * 2


def test_rollout_batch_places_token_values_at_the_completion_positions():
    stream = PromptStream(_dataset(["mixed"]), seed=0)
    cfg = _cfg(prompts_per_step=1)
    rollouts = generate(cfg, ScriptedBackend(), stream, RewardScorer([reward_b]), step=0)
    batch = RolloutBatch(rollouts, False, 1.0, pad_id=0)
    # row 1 is prompt [1, 5] + 'b' [7, 7, 7]: slots 0..2 sit at positions 1..3
    batch.token_values["x"] = np.arange(12, dtype=np.float64).reshape(4, 3)
    arrays = batch.collate([1, 0])
    np.testing.assert_array_equal(arrays["x"], [[0, 3, 4, 5, 0], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(arrays["loss_mask"], [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    batch.store("y", [1, 0], arrays["x"] * 2)
    np.testing.assert_array_equal(batch.token_values["y"][:2], [[0, 2, 0], [6, 8, 10]])
