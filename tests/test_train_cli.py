"""End to end through ``python -m mlx_ft sft`` / ``python -m cuda_ft sft`` (in-process ``run_cli``).

Covers the CLI, the shared loop (metrics, checkpoints, adapters, resume, accumulation) and the
cross-backend parity of whole loss curves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
ADAPTER_FILE = {"mlx": "adapters.safetensors", "torch": "adapter_model.safetensors"}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Messages data with a rule (the reply repeats the word twice), plus a prompt/completion valid set."""
    d = tmp_path_factory.mktemp("sft_data")
    rng = np.random.default_rng(0)
    with (d / "train.jsonl").open("w") as f:
        for i in range(24):
            w = WORDS[i % len(WORDS)]
            turns = [{"role": "user", "content": f"say {w}"},
                     {"role": "assistant", "content": f"{w} {w}"}]
            if rng.random() < 0.3:
                turns += [{"role": "user", "content": "again"},
                          {"role": "assistant", "content": f"{w} {w} {w}"}]
            f.write(json.dumps({"messages": turns}) + "\n")
    with (d / "valid.jsonl").open("w") as f:
        for w in WORDS[:4]:
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"say {w}"}],
                                "completion": [{"role": "assistant", "content": f"{w} {w}"}]}) + "\n")
    return d


def _train(backend: str, model_dir, data, run_dir, *extra: str) -> int:
    prog, spec = BACKENDS[backend]
    argv = ["sft", "--model", str(model_dir), "--data", str(data), "--run-dir", str(run_dir),
            "--steps", "6", "--batch-size", "2", "--max-length", "64", "--learning-rate", "1e-2",
            "--no-progress", "--logprob-chunk-size", "37", *extra]
    return run_cli(prog, spec, argv)


def _metrics(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_sft_end_to_end(backend, tiny_llama_dir, sft_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(backend, tiny_llama_dir, sft_data, run, "--save-every", "3", "--eval-every", "3",
                  "--sample-prompt", "say red", "--sample-max-tokens", "4") == 0
    train = _metrics(run)
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("loss", "tokens_per_second", "learning_rate", "grad_norm", "peak_memory_gb"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in _metrics(run, "valid")] == [3, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    assert (run / "adapters" / ADAPTER_FILE[backend]).is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 6 and config["lora_rank"] == 8 and config["backend"]
    out = capsys.readouterr().out
    assert '"steps": 6' in out and ">>> say red" in out


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_resume_equals_uninterrupted(backend, tiny_llama_dir, sft_data, tmp_path):
    run = tmp_path / "run"
    args = ("--save-every", "3", "--lora-dropout", "0.1", "--packing")
    assert _train(backend, tiny_llama_dir, sft_data, run, *args) == 0
    straight = load_file(str(run / "adapters" / ADAPTER_FILE[backend]))
    # Forget everything after step 3, then continue from that checkpoint.
    shutil.rmtree(run / "checkpoints" / "step_000006")
    shutil.rmtree(run / "adapters")
    assert _train(backend, tiny_llama_dir, sft_data, run, *args, "--resume") == 0
    resumed = load_file(str(run / "adapters" / ADAPTER_FILE[backend]))
    assert straight.keys() == resumed.keys()
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_grad_accumulation_4x1_equals_batch_4(backend, tiny_llama_dir, sft_data, tmp_path):
    a, b = tmp_path / "b4", tmp_path / "b1x4"
    assert _train(backend, tiny_llama_dir, sft_data, a, "--batch-size", "4", "--steps", "3") == 0
    assert _train(backend, tiny_llama_dir, sft_data, b, "--batch-size", "1",
                  "--grad-accumulation-steps", "4", "--steps", "3") == 0
    la, lb = [r["loss"] for r in _metrics(a)], [r["loss"] for r in _metrics(b)]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loss_curves_match_across_backends(family, tiny_llama_dir, tiny_qwen2_dir, sft_data,
                                           tmp_path):
    model = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    curves = {}
    for backend in BACKENDS:
        run = tmp_path / backend
        assert _train(backend, model, sft_data, run, "--steps", "10", "--packing",
                      "--learning-rate", "5e-3") == 0
        curves[backend] = [r["loss"] for r in _metrics(run)]
    assert len(curves["mlx"]) == 10
    np.testing.assert_allclose(curves["mlx"], curves["torch"], rtol=1e-4)


def test_bad_data_fails_before_the_model_loads(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert _train("mlx", tiny_llama_dir, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "mlx_ft: device" not in err


def test_existing_run_dir_needs_resume(tiny_llama_dir, sft_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("mlx", tiny_llama_dir, sft_data, run, "--steps", "1") == 0
    assert _train("mlx", tiny_llama_dir, sft_data, run, "--steps", "1") == 2
    assert "pass --resume" in capsys.readouterr().err
    # A resumed run may not change what shapes the run.
    assert _train("mlx", tiny_llama_dir, sft_data, run, "--steps", "2", "--resume",
                  "--lora-rank", "4") == 2
    assert "lora_rank=8" in capsys.readouterr().err


@pytest.mark.parametrize("prog", ["mlx_ft", "cuda_ft"])
def test_module_lists_algorithms_and_help_is_light(prog):
    listing = subprocess.run([sys.executable, "-m", prog], capture_output=True, text=True, check=True)
    assert "sft" in listing.stdout and "algorithms:" in listing.stdout
    probe = (f"import sys; from algorithms.cli import run_cli\n"
             f"try: run_cli({prog!r}, 'x:y', ['sft', '--help'])\nexcept SystemExit: pass\n"
             "print('HEAVY' if {'mlx.core', 'torch'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "--lora-rank" in out.stdout and out.stdout.strip().endswith("LIGHT")


def test_schedule_and_epochs_drive_the_loop(tiny_llama_dir, sft_data, tmp_path):
    from algorithms.schedule import learning_rate

    run = tmp_path / "run"
    # 24 examples / batch 4 = 6 micro-batches per epoch; 2 epochs with accumulation 2 = 6 steps.
    assert _train("mlx", tiny_llama_dir, sft_data, run, "--steps", "0", "--epochs", "2",
                  "--batch-size", "4", "--grad-accumulation-steps", "2", "--lr-schedule", "cosine",
                  "--warmup-steps", "2", "--min-lr-ratio", "0.1") == 0
    train = _metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in train] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2], abs=1e-4)
    want = [learning_rate(s, 6, 1e-2, "cosine", 2, 0.1) for s in range(6)]
    np.testing.assert_allclose([r["learning_rate"] for r in train], want, rtol=1e-12)


def test_skip_invalid_reports_and_trains(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "say red", "completion": " red red"})
    lines = [good, '{"prompt": "x"}', good, "{not json", good]
    data.write_text("".join(f"{line}\n" for line in lines))
    assert _train("mlx", tiny_llama_dir, data, tmp_path / "strict", "--steps", "1") == 2
    assert "train.jsonl:2" in capsys.readouterr().err
    assert _train("mlx", tiny_llama_dir, data, tmp_path / "run", "--steps", "1",
                  "--skip-invalid") == 0
    err = capsys.readouterr().err
    assert "3 examples" in err and "skipped 2" in err, err
