"""Resume cannot be fooled, and a run dir holds one run: the cases a crash or a careless
``--resume`` produce (in-process ``run_cli`` on the tiny model)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import make_tiny_model

from algorithms.cli import run_cli

pytest.importorskip("mlx")

MLX = ("mlx_ft", "mlx_ft.backend:MLXBackend")
TORCH = ("cuda_ft", "cuda_ft.backend:TorchBackend")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    rows = [{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in words * 4]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def train(model, data, run, *extra, backend=MLX) -> int:
    argv = ["sft", "--model", str(model), "--data", str(data), "--run-dir", str(run),
            "--steps", "4", "--batch-size", "2", "--max-length", "32", "--no-progress",
            "--save-every", "2", *extra]
    return run_cli(*backend, argv)


@pytest.fixture
def finished(tiny_llama_dir, data, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path / "run"
    assert train(tiny_llama_dir, data, run) == 0
    return run


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def steps(run, name="metrics.jsonl", split="train"):
    rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
    return [r["step"] for r in rows if r.get("split", split) == split]


@pytest.mark.parametrize("flags, said", [
    (["--learning-rate", "3e-4"], "learning_rate=0.0001"),
    (["--batch-size", "1"], "batch_size=2"),
    (["--lora-rank", "4"], "lora_rank=8"),
])
def test_a_refused_resume_changes_nothing(finished, tiny_llama_dir, data, capsys, flags, said):
    """Regression: a refused --resume overwrote config.json with the refused settings."""
    before = snapshot(finished)
    assert train(tiny_llama_dir, data, finished, "--steps", "6", "--resume", *flags) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert snapshot(finished) == before


def test_resume_on_another_backend_or_model_is_refused(finished, tiny_llama_dir, tiny_qwen2_dir,
                                                       data, capsys):
    before = snapshot(finished)
    assert train(tiny_llama_dir, data, finished, "--steps", "6", "--resume", backend=TORCH) == 2
    assert "written by the mlx backend; this is the torch backend" in capsys.readouterr().err
    assert train(tiny_qwen2_dir, data, finished, "--steps", "6", "--resume") == 2
    assert "model=" in capsys.readouterr().err
    assert snapshot(finished) == before


def test_changed_data_at_the_same_path_is_refused(finished, tiny_llama_dir, data, tmp_path,
                                                  capsys):
    """Regression: --resume continued on a 5-line file cut from a longer one."""
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (cut / "train.jsonl").write_text("".join(lines))
    run = tmp_path / "run2"
    assert train(tiny_llama_dir, cut, run) == 0
    (cut / "train.jsonl").write_text("".join(lines[:5]))
    before = snapshot(run)
    assert train(tiny_llama_dir, cut, run, "--steps", "6", "--resume") == 2
    err = capsys.readouterr().err
    assert "the train data changed since the checkpoint at step 4" in err
    assert "24 examples then" in err and "5 examples now" in err
    assert snapshot(run) == before


def test_regenerated_weights_are_refused(data, tmp_path, capsys):
    """Regression: --resume continued on regenerated weights at the same path."""
    model = make_tiny_model(tmp_path / "model", family="llama")
    run = tmp_path / "run"
    assert train(model, data, run) == 0
    weights = load_file(str(model / "model.safetensors"))
    rng = np.random.default_rng(1)
    save_file({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    assert train(model, data, run, "--steps", "6", "--resume") == 2
    err = capsys.readouterr().err
    assert "the model changed since the checkpoint at step 4" in err
    assert "): model.safetensors changed;" in err


def test_steps_below_the_checkpoint_is_an_error(finished, tiny_llama_dir, data, capsys):
    """Regression: --steps 2 on a step-4 checkpoint "finished" and rewrote config.json."""
    before = snapshot(finished)
    assert train(tiny_llama_dir, data, finished, "--steps", "2", "--resume") == 2
    assert "--steps 2 is below the checkpoint's step 4" in capsys.readouterr().err
    assert train(tiny_llama_dir, data, finished, "--resume") == 2
    assert "already finished at step 4" in capsys.readouterr().err
    assert snapshot(finished) == before


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(finished, tiny_llama_dir, data,
                                                               capsys):
    latest = finished / "checkpoints" / "step_000004"
    weights = latest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a full disk
    shutil.rmtree(finished / "adapters")
    assert train(tiny_llama_dir, data, finished, "--resume") == 0
    err = capsys.readouterr().err
    assert f"skipping {latest}: incomplete or corrupt (trainable.safetensors is" in err
    assert "Traceback" not in err
    assert steps(finished) == [1, 2, 3, 4]  # steps 3-4 redone from step 2, logged once


def test_a_checkpoint_that_does_not_load_falls_back(finished, tiny_llama_dir, data, capsys):
    latest = finished / "checkpoints" / "step_000004"
    manifest = json.loads((latest / "manifest.json").read_text())
    (latest / "optimizer.safetensors").write_bytes(b"\0" * manifest["optimizer.safetensors"]["size"])
    (latest / "manifest.json").unlink()  # as written by a version without manifests
    shutil.rmtree(finished / "adapters")
    assert train(tiny_llama_dir, data, finished, "--resume") == 0
    err = capsys.readouterr().err
    assert f"{latest} does not load" in err and "falling back to" in err


def test_resumed_metrics_do_not_repeat_steps(finished, tiny_llama_dir, data):
    """Regression: rows logged after the last checkpoint were logged again after resume."""
    shutil.rmtree(finished / "checkpoints" / "step_000004")  # killed after logging step 4
    shutil.rmtree(finished / "adapters")
    with open(finished / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "lo')  # and mid-way through a line
    assert train(tiny_llama_dir, data, finished, "--steps", "6", "--resume") == 0
    assert steps(finished) == [1, 2, 3, 4, 5, 6]
    assert steps(finished, split="valid") == []


def test_a_second_run_in_the_same_dir_is_refused(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    try:
        assert train(tiny_llama_dir, data, run) == 2
        assert "another run is using it right now" in capsys.readouterr().err
        assert list(run.iterdir()) == []
    finally:
        os.close(fd)
    assert train(tiny_llama_dir, data, run, "--steps", "1") == 0


def test_checkpoints_are_fsynced_before_the_rename(finished, tiny_llama_dir, data, monkeypatch):
    from converters import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace",
                        lambda a, b: (events.append(f"rename {os.path.basename(b)}"),
                                      real_replace(a, b)))
    shutil.rmtree(finished / "checkpoints" / "step_000004")
    shutil.rmtree(finished / "adapters")
    assert train(tiny_llama_dir, data, finished, "--resume") == 0
    rename = events.index("rename step_000004")
    files = len(list((finished / "checkpoints" / "step_000004").iterdir()))
    assert events[:rename].count("fsync") >= files + 1  # every file, and the directory


def test_a_failed_fresh_run_leaves_no_run_dir(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tiny_llama_dir, data, run, "--target-modules", "nope_proj") == 2
    assert "--target-modules nope_proj: no such linear layer" in capsys.readouterr().err
    assert not run.exists()
