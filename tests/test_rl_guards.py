"""Online RL runs that a reward function would end, hang or starve stop with a clear error;
a resumed RL run does not log a step twice."""

from __future__ import annotations

import collections
import json
import shutil

import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")

MLX = ("mlx_ft", "mlx_ft.backend:MLXBackend")
REWARDS = '''
import sys, time

def quits(prompts, completions, **kwargs):
    sys.exit(0)

async def blocks(prompts, completions, **kwargs):
    time.sleep(30)
    return [0.0] * len(completions)

def never(prompts, completions, **kwargs):
    return [None] * len(completions)

def length(prompts, completions, completion_ids=None, **kwargs):
    return [float(len(ids) % 3) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    rows = [{"prompt": f"say {w}"} for w in ["red", "blue", "green", "cat"]]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "rewards.py").write_text(REWARDS)
    return d


def grpo(model, data, run, reward, *extra) -> int:
    return run_cli(*MLX, ["grpo", "--model", str(model), "--data", str(data), "--run-dir",
                          str(run), "--reward", f"{data / 'rewards.py'}:{reward}", "--steps", "3",
                          "--prompts-per-step", "2", "--num-generations", "2",
                          "--max-completion-length", "4", "--max-length", "32", "--beta", "0",
                          "--no-progress", *extra])


def test_a_reward_calling_sys_exit_stops_the_run(tiny_llama_dir, rl_data, tmp_path, capsys):
    """Regression: sys.exit(0) in a reward ended grpo with exit code 0 and no steps."""
    assert grpo(tiny_llama_dir, rl_data, tmp_path / "run", "quits") == 2
    err = capsys.readouterr().err
    assert "reward function 'quits' raised SystemExit(0)" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_blocking_async_reward_is_stopped_by_the_timeout(tiny_llama_dir, rl_data, tmp_path,
                                                           capsys):
    """Regression: an async reward calling time.sleep hung the run forever."""
    assert grpo(tiny_llama_dir, rl_data, tmp_path / "run", "blocks", "--reward-timeout",
                "0.5") == 2
    assert "reward function 'blocks' timed out after 0.5 s" in capsys.readouterr().err


def test_rewards_that_are_all_none_stop_after_the_patience(tiny_llama_dir, rl_data, tmp_path,
                                                           capsys):
    assert grpo(tiny_llama_dir, rl_data, tmp_path / "run", "never", "--unscored-patience",
                "2") == 2
    err = capsys.readouterr().err
    assert "step 2: every reward of the last 2 generation batches was None or NaN" in err
    assert "(reward functions: never)" in err


def test_resumed_completions_do_not_repeat_steps(tiny_llama_dir, rl_data, tmp_path):
    run = tmp_path / "run"
    args = ("--steps", "4", "--save-every", "2", "--log-completions-every", "1")
    assert grpo(tiny_llama_dir, rl_data, run, "length", *args) == 0
    shutil.rmtree(run / "checkpoints" / "step_000004")  # killed after step 4 was logged
    shutil.rmtree(run / "adapters")
    assert grpo(tiny_llama_dir, rl_data, run, "length", *args, "--resume") == 0
    rows = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert collections.Counter(r["step"] for r in rows) == {0: 4, 1: 4, 2: 4, 3: 4}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
