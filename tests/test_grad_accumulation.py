"""Gradient accumulation changes nothing but memory, for every algorithm: 4 micro-batches of 1
example equal 1 micro-batch of 4 (losses per step and the trained weights), offline through
``--grad-accumulation-steps`` and online through ``--batch-size`` (micro-batches of a
generation batch). Regression: a loss whose micro-batch share (``micro_fraction``) or
denominator (``num_items``) is wrong gives ~4x the update with 4 micro-batches and fails here.

KTO's KL estimate needs two examples per micro-batch, so its ``kto`` loss is checked as 2 x 2
against 1 x 4 (the estimate is taken over the whole step); ``apo_zero_unpaired`` as 4 x 1. Not
covered, by nature: ``aot`` (it sorts within the micro-batch), ``bnpo`` (a token mean per
micro-batch, as TRL), WPO with the ``sft`` term (the micro-batch's mean pair weight).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlx")
pytest.importorskip("torch")

from algorithms.cli import run_cli

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
COMMON = ["--steps", "2", "--learning-rate", "1e-2", "--adam-epsilon", "1e-4", "--no-progress",
          "--dtype", "float32", "--max-length", "64", "--seed", "5", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 examples of each kind (two whole steps of 4), and a prompt set with a reward."""
    d = tmp_path_factory.mktemp("accum")
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rows = {
        "sft.jsonl": [{"messages": [{"role": "user", "content": f"say {w}"},
                                    {"role": "assistant", "content": f"{w} {w} ok"}]}
                      for w in words],
        "pairs.jsonl": [{"prompt": f"say {w}", "chosen": f" {w} yes", "rejected": f" no {w} x"}
                        for w in words],
        "kto.jsonl": [{"prompt": f"say {w}", "completion": f" {w}", "label": i % 2 == 0}
                      for i, w in enumerate(words)],
        "prompts.jsonl": [{"prompt": [{"role": "user", "content": f"say {w}"}]}
                          for w in words],
    }
    for name, lines in rows.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "reward.py").write_text(
        "def odd(prompts, completions, completion_ids=None, **kw):\n"
        "    return [float(sum(ids) % 3) / 2 for ids in completion_ids]\n")
    return d


def _run(prog, spec, argv, run_dir):
    assert run_cli(prog, spec, [*argv, "--run-dir", str(run_dir)]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    from safetensors.numpy import load_file

    last = max((run_dir / "checkpoints").iterdir())
    return losses, load_file(str(last / "trainable.safetensors"))


def _compare(a, b):
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, atol=2e-6)  # float32 rounding
    assert set(weights_a) == set(weights_b)
    moved = 0
    for key in weights_a:
        np.testing.assert_allclose(weights_b[key], weights_a[key], rtol=0, atol=5e-6,
                                   err_msg=key)
        moved += not np.allclose(weights_a[key], 0)
    assert moved > 0


OFFLINE = {
    "sft": ("mlx", "sft.jsonl", [], (1, 4)),
    "dpo": ("torch", "pairs.jsonl", [], (1, 4)),
    "dpo_wpo_mpo": ("mlx", "pairs.jsonl", ["--loss-type", "sigmoid", "ipo", "--use-weighting"],
                    (1, 4)),
    "dpo_rpo": ("torch", "pairs.jsonl", ["--loss-type", "sigmoid", "sft"], (1, 4)),
    "cpo": ("torch", "pairs.jsonl", [], (1, 4)),
    "simpo": ("mlx", "pairs.jsonl", [], (1, 4)),
    "orpo": ("torch", "pairs.jsonl", ["--nll-include-prompt"], (1, 4)),
    "kto": ("mlx", "kto.jsonl", [], (2, 2)),
    "kto_apo": ("torch", "kto.jsonl", ["--loss-type", "apo_zero_unpaired"], (1, 4)),
    # BCO's running delta is folded over the whole step before its first micro-batch
    "bco": ("torch", "kto.jsonl", [], (1, 4)),
    "dpo_bco": ("mlx", "pairs.jsonl", ["--loss-type", "bco_pair", "--bco-running-delta"],
                (1, 4)),
}


@pytest.mark.parametrize("case", list(OFFLINE))
def test_offline_accumulation(case, data, tiny_llama_dir, tmp_path):
    backend, file, extra, (micro, accum) = OFFLINE[case]
    algo = case.split("_")[0]
    prog, spec = BACKENDS[backend]
    argv = [algo, "--model", str(tiny_llama_dir), "--data", str(data / file), *COMMON, *extra]
    whole = _run(prog, spec, [*argv, "--batch-size", "4"], tmp_path / "whole")
    split = _run(prog, spec, [*argv, "--batch-size", str(micro), "--grad-accumulation-steps",
                              str(accum)], tmp_path / "split")
    _compare(whole, split)


ONLINE = {
    "grpo": ("mlx", ["--num-iterations", "2"]),
    "dr_grpo": ("torch", ["--num-iterations", "2"]),
    "dapo": ("mlx", ["--num-iterations", "2", "--no-dynamic-sampling"]),
    "gspo": ("torch", ["--num-iterations", "2"]),
    "rloo": ("mlx", ["--num-iterations", "2", "--num-generations", "2"]),
    "reinforce_pp": ("torch", ["--num-iterations", "2", "--num-generations", "1",
                               "--prompts-per-step", "4"]),
    "reinforce_pp_baseline": ("mlx", ["--num-iterations", "2"]),
    "ppo": ("torch", ["--num-iterations", "2", "--num-generations", "1",
                      "--prompts-per-step", "4", "--entropy-coef", "0.01"]),
    "grpo-vespo": ("mlx", ["--num-iterations", "2", "--loss-type", "vespo"]),
    "grpo-sapo": ("torch", ["--num-iterations", "2", "--loss-type", "sapo"]),
    "gspo-luspo": ("mlx", ["--num-iterations", "2", "--loss-type", "luspo"]),
}


@pytest.mark.parametrize("algo", list(ONLINE))
def test_online_accumulation(algo, data, tiny_llama_dir, tmp_path):
    backend, extra = ONLINE[algo]
    prog, spec = BACKENDS[backend]
    argv = [algo.split("-")[0], "--model", str(tiny_llama_dir), "--data", str(data / "prompts.jsonl"),
            "--reward", f"{data / 'reward.py'}:odd", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-completion-length", "6", "--temperature", "1.3",
            "--log-completions-every", "0", *COMMON, *extra]
    whole = _run(prog, spec, [*argv, "--batch-size", "4"], tmp_path / "whole")
    split = _run(prog, spec, [*argv, "--batch-size", "1"], tmp_path / "split")
    _compare(whole, split)


PAIRS = {"online_dpo": "mlx", "xpo": "torch", "nash_md": "mlx"}


@pytest.mark.parametrize("algo", list(PAIRS))
def test_pair_accumulation(algo, data, tiny_llama_dir, tmp_path):
    """Online preference learning: micro-batches of 1 pair equal one of 4 (the step's pairs)."""
    prog, spec = BACKENDS[PAIRS[algo]]
    argv = [algo, "--model", str(tiny_llama_dir), "--data", str(data / "prompts.jsonl"),
            "--reward", f"{data / 'reward.py'}:odd", "--prompts-per-step", "4",
            "--max-completion-length", "6", "--temperature", "1.3", "--num-iterations", "2",
            "--log-completions-every", "0", *COMMON]
    whole = _run(prog, spec, [*argv, "--batch-size", "4"], tmp_path / "whole")
    split = _run(prog, spec, [*argv, "--batch-size", "1"], tmp_path / "split")
    _compare(whole, split)


def test_gkd_accumulation(data, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    """GKD's token mean over the step: 4 micro-batches of 1 completion equal one of 4, on data
    and on student completions (lmbda 0.5 over the steps)."""
    prog, spec = BACKENDS["torch"]
    argv = ["gkd", "--model", str(tiny_llama_dir), "--teacher", str(tiny_qwen2_dir),
            "--data", str(data / "sft.jsonl"), "--prompts-per-step", "4",
            "--max-completion-length", "6", "--log-completions-every", "0", *COMMON,
            "--steps", "4"]
    whole = _run(prog, spec, [*argv, "--batch-size", "4"], tmp_path / "whole")
    split = _run(prog, spec, [*argv, "--batch-size", "1"], tmp_path / "split")
    _compare(whole, split)
