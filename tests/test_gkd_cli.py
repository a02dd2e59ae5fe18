"""GKD end to end through both CLIs on the tiny models: student, teacher and data sources,
what is logged and written, the teacher's tokenizer and vocabulary checked before any model
loads, and a resumed run equal to an uninterrupted one (the source of each step included)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("teacher"), family="qwen2", seed=4,
                           hidden_size=96, layers=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gkd")
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}],
             "completion": [{"role": "assistant", "content": f"{w} {w}"}]} for w in WORDS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    prompts = d / "prompts"
    prompts.mkdir()
    (prompts / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Q: say {w}. A:"}) + "\n" for w in WORDS))
    return d


def _argv(model, teacher, data, run_dir, *extra):
    return ["gkd", "--model", str(model), "--teacher", str(teacher), "--data", str(data),
            "--run-dir", str(run_dir), "--prompts-per-step", "3", "--batch-size", "2",
            "--max-completion-length", "6", "--max-length", "48", "--learning-rate", "2e-2",
            "--no-progress", "--dtype", "float32", "--log-completions-every", "1", *extra]


def _records(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_runs_on_student_and_data_completions(backend, tiny_llama_dir, teacher, data, tmp_path):
    prog, spec = BACKENDS[backend]
    run = tmp_path / "gkd"
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data, run, "--steps", "6",
                                     "--beta", "0.3", "--distill-temperature", "0.8")) == 0
    train = _records(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    sources = [r["gkd/student_completions"] for r in train]
    assert 0 < sum(sources) < 6  # lmbda 0.5: both kinds of step over six draws
    for r in train:
        assert r["divergence"] > 0 and np.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["gkd/teacher_completions"] == 0
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["sampled_from"] for s in samples} == {"student", "data"}
    data_sample = next(s for s in samples if s["sampled_from"] == "data")
    word = data_sample["prompt"][0]["content"].split()[-1]
    assert data_sample["completion"][0]["content"] == f"{word} {word}"
    (valid,) = _records(run, "valid")
    assert valid["divergence"] > 0 and valid["on_student_samples"] == 0


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_teacher_completions_and_prompts_alone(backend, tiny_llama_dir, teacher, data, tmp_path):
    prog, spec = BACKENDS[backend]
    run = tmp_path / "seqkd"
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data / "prompts", run,
                                     "--steps", "2", "--lmbda", "0", "--seq-kd")) == 0
    assert [r["gkd/teacher_completions"] for r in _records(run)] == [1.0, 1.0]
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["sampled_from"] for s in samples} == {"teacher"}


def test_errors_come_before_any_model_loads(tiny_llama_dir, teacher, data, tmp_path, capsys):
    from tiny import make_tiny_model
    from transformers import AutoTokenizer

    prog, spec = BACKENDS["mlx"]
    other_tok = make_tiny_model(tmp_path / "other_tok")
    tok = AutoTokenizer.from_pretrained(str(other_tok))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(other_tok))
    wide = make_tiny_model(tmp_path / "wide", vocab_size=512)
    cases = [
        ((data / "prompts", teacher), "train.jsonl:1: a prompt alone"),
        ((data, other_tok), "its tokenizer is not the student's"),
        ((data, wide), "its vocab_size is 512, the student's 384"),
        ((data, tmp_path / "nowhere"), "--teacher"),
    ]
    for (data_dir, teacher_dir), message in cases:
        assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher_dir, data_dir,
                                         tmp_path / "r", "--steps", "1")) == 2
        err = capsys.readouterr().err
        assert message in err and "mlx_ft: device" not in err, err
    assert run_cli(prog, spec, ["gkd", "--model", str(tiny_llama_dir), "--data", str(data),
                                "--run-dir", str(tmp_path / "r")]) == 2
    assert "--teacher=''" in capsys.readouterr().err


def test_resume_equals_an_uninterrupted_run(tiny_llama_dir, teacher, data, tmp_path):
    from safetensors.numpy import load_file

    prog, spec = BACKENDS["torch"]
    args = ["--log-completions-every", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data, whole, *args,
                                     "--steps", "4", "--save-every", "2")) == 0
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data, split, *args,
                                     "--steps", "2")) == 0
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data, split, *args,
                                     "--steps", "4", "--resume")) == 0
    keys = ("loss", "divergence", "gkd/student_completions")
    want = [[r[k] for k in keys] for r in _records(whole)]
    got = [[r[k] for k in keys] for r in _records(split)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    a = load_file(str(whole / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000004" / "trainable.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_evaluate_reproduces_the_last_validation(tiny_llama_dir, teacher, data, tmp_path,
                                                 capsys):
    """``evaluate --run`` on a GKD run prints the divergence to the teacher that the loop logged
    for the validation split at the end (the evaluate verb once asked GKD for rewards)."""
    prog, spec = BACKENDS["mlx"]
    run = tmp_path / "gkd"
    assert run_cli(prog, spec, _argv(tiny_llama_dir, teacher, data, run, "--steps", "2")) == 0
    capsys.readouterr()
    assert run_cli(prog, spec, ["evaluate", "--run", str(run), "--split", "valid"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["algorithm"] == "gkd"
    last = _records(run, "valid")[-1]
    np.testing.assert_allclose(result["metrics"]["divergence"], last["divergence"], rtol=1e-5)
