"""One generation batch without a model: scripted completions, real scorer, DAPO's dynamic
sampling, and the micro-batch layout the policy loss reads."""

from __future__ import annotations

import types

import numpy as np
import pytest

from algorithms.rl.batches import micro_batches
from algorithms.rl.data import PromptDataset, PromptExample, PromptReport, PromptStream
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
    base = {"num_generations": 4, "prompts_per_step": 2, "max_completion_length": 3,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "stop": [],
            "rollout_batch_size": 0, "seed": 0, "dynamic_sampling": False,
            "max_sampling_rounds": 3, "scale_rewards": "group",
            "multi_objective_aggregation": "sum_then_normalize", "batch_size": 3,
            "mask_truncated_completions": False}
    return types.SimpleNamespace(**{**base, **kw})


def test_generation_batch_advantages_and_stats():
    stream = PromptStream(_dataset(["mixed", "flat"]), seed=0)
    rollouts = generate(_cfg(), ScriptedBackend(), stream, RewardScorer([reward_b]), step=0)
    assert len(rollouts) == 8
    mixed = [i for i, e in enumerate(rollouts.examples) if e.prompt.startswith("mixed")]
    flat = [i for i, e in enumerate(rollouts.examples) if e.prompt.startswith("flat")]
    # mixed group rewards 0,1,0,1: mean 0.5, Bessel std sqrt(1/3) -> A = +-0.5 / (0.57735 + 1e-4)
    np.testing.assert_allclose(rollouts.advantages[mixed], [-0.86588, 0.86588] * 2, rtol=1e-4)
    np.testing.assert_array_equal(rollouts.advantages[flat], 0.0)
    assert rollouts.stats["frac_reward_zero_std"] == 0.5
    assert rollouts.stats["reward"] == pytest.approx(2 / 8)
    assert rollouts.stats["completions/max_length"] == 3
    assert rollouts.stats["completions/clipped_ratio"] == pytest.approx(2 / 8)


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
    # each round asks only for the groups still missing, with its own seed
    assert backend.calls[0][0] == 2 * 4
    assert len({seed for _, seed in backend.calls}) == len(backend.calls)


def test_dynamic_sampling_stops_at_its_cap_and_tops_up():
    backend = ScriptedBackend()
    stream = PromptStream(_dataset(["flat"] * 6), seed=0)
    cfg = _cfg(dynamic_sampling=True, max_sampling_rounds=3)
    rollouts = generate(cfg, backend, stream, RewardScorer([reward_b]), step=0)
    assert len(backend.calls) == 3  # the cap
    assert rollouts.stats["dynamic_sampling/rounds"] == 3
    assert rollouts.stats["dynamic_sampling/topped_up_groups"] == 2
    assert rollouts.stats["frac_reward_zero_std"] == 1.0
    assert len(rollouts) == 8 and not rollouts.advantages.any()


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_micro_batches_layout(mask_truncated):
    stream = PromptStream(_dataset(["mixed", "mixed"]), seed=0)
    cfg = _cfg(mask_truncated_completions=mask_truncated, temperature=0.7)
    rollouts = generate(cfg, ScriptedBackend(), stream, RewardScorer([reward_b]), step=0)
    arrays = micro_batches(rollouts, cfg, pad_id=0)
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
    assert sorted(order.tolist()) == sorted(rollouts.advantages.tolist())


class StatsBackend(ScriptedBackend):
    """Counts the no-gradient passes the loop asks for."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def per_token_entropy(self, arrays):
        self.passes.append("entropy")
        return np.full(arrays["loss_mask"].shape, 2.0, np.float32)

    def per_token_logps(self, arrays):
        self.passes.append("old")
        return np.zeros(arrays["loss_mask"].shape, np.float32)

    def reference_per_token_logps(self, arrays):
        self.passes.append("reference")
        return np.zeros(arrays["loss_mask"].shape, np.float32)


@pytest.mark.parametrize("beta, mu, wanted", [(0.0, 1, set()), (0.04, 1, {"reference"}),
                                              (0.0, 2, {"old"}), (0.04, 2, {"old", "reference"})])
def test_reference_only_with_kl_and_old_logps_only_off_policy(beta, mu, wanted):
    from algorithms.rl.trainer import _prepare_batches

    backend = StatsBackend()
    cfg = _cfg(beta=beta, num_iterations=mu)
    rollouts = generate(cfg, backend, PromptStream(_dataset(["mixed", "flat"]), seed=0),
                        RewardScorer([reward_b]), step=0)
    arrays, stats = _prepare_batches(cfg, backend, rollouts, pad_id=0)
    assert set(backend.passes) - {"entropy"} == wanted
    assert ("ref_logps" in arrays[0]) == (beta > 0) and ("old_logps" in arrays[0]) == (mu > 1)
    assert stats["entropy"] == pytest.approx(2.0)
