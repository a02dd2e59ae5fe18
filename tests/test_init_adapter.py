"""``--init-adapter`` and ``evaluate``: a run continues from an adapter (either format) with the
starting point as its reference, and ``evaluate`` reproduces the training loop's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon"]
COMMON = ["--batch-size", "4", "--max-length", "48", "--no-progress", "--no-plots",
          "--dtype", "float32", "--logprob-chunk-size", "37"]


def _messages(w, reply):
    return {"prompt": [{"role": "user", "content": f"say {w}"}],
            "completion": [{"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An SFT set (sft/) and a preference set (pref/), both with valid and test splits."""
    root = tmp_path_factory.mktemp("stages")
    for name, rows in (("sft", lambda w: _messages(w, f"{w} {w}")),
                       ("pref", lambda w: {"prompt": f"say {w}", "chosen": f" {w} {w}",
                                           "rejected": f" not {w}"})):
        d = root / name
        d.mkdir()
        for split, words in (("train", WORDS * 2), ("valid", WORDS[:4]), ("test", WORDS[4:])):
            (d / f"{split}.jsonl").write_text("".join(json.dumps(rows(w)) + "\n" for w in words))
    return root


def _run(backend, algo, model, data_dir, run_dir, *extra):
    prog, spec = BACKENDS[backend]
    return run_cli(prog, spec, [algo, "--model", str(model), "--data", str(data_dir),
                                "--run-dir", str(run_dir), "--steps", "3",
                                "--learning-rate", "5e-3", *COMMON, *extra])


def _records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def sft_run(tiny_llama_dir, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "run"
    assert _run("mlx", "sft", tiny_llama_dir, data / "sft", run) == 0
    return run


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_dpo_from_adapter_equals_dpo_on_fused_model(backend, sft_run, tiny_llama_dir, data,
                                                    tmp_path):
    """SFT -> DPO with --init-adapter (an MLX adapter, also read by torch) logs the losses and
    reward metrics of SFT -> fuse -> DPO: the policy and the reference both start at base +
    SFT adapter, and the new adapter has the same init; the saved adapter (both stacked) loads
    on the base and evaluates to the run's last validation numbers."""
    from converters.fuse import fuse

    fused = fuse(tiny_llama_dir, sft_run / "adapters", tmp_path / "fused")
    stacked, plain = tmp_path / "stacked", tmp_path / "plain"
    assert _run(backend, "dpo", tiny_llama_dir, data / "pref", stacked,
                "--init-adapter", str(sft_run / "adapters")) == 0
    assert _run(backend, "dpo", fused, data / "pref", plain) == 0
    for split in ("train", "valid", "test"):
        got, want = _records(stacked, split), _records(plain, split)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            for key in ("loss", "rewards/chosen", "rewards/margin", "rewards/accuracy"):
                np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert _records(stacked, "train")[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    config = json.loads((stacked / "adapters" / "adapter_config.json").read_text())
    assert config.get("r", config.get("lora_parameters", {}).get("rank")) == 16  # 8 + 8
    # evaluate: the stacked adapter on the base, the run's init adapter as the reference
    prog, spec = BACKENDS[backend]
    out = tmp_path / "eval.json"
    assert run_cli(prog, spec, ["evaluate", "--run", str(stacked), "--split", "valid",
                                "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    last = _records(stacked, "valid")[-1]
    for key in ("loss", "rewards/margin", "rewards/accuracy"):
        np.testing.assert_allclose(metrics[key], last[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_evaluate_equals_training_validation_and_test(sft_run, capsys):
    """evaluate (default split: test) prints the loss the training loop logged for the test
    split at the end, and --split valid the last validation record, perplexity = exp(loss);
    the torch backend reads the MLX adapter and agrees."""
    for split, record in (("test", _records(sft_run, "test")[-1]),
                          ("valid", _records(sft_run, "valid")[-1])):
        for backend in ("mlx", "torch"):
            prog, spec = BACKENDS[backend]
            argv = ["evaluate", "--run", str(sft_run)] + (["--split", split] * (split == "valid"))
            capsys.readouterr()
            assert run_cli(prog, spec, argv) == 0
            result = json.loads(capsys.readouterr().out)
            assert result["split"] == split and result["algorithm"] == "sft"
            tol = 1e-6 if backend == "mlx" else 1e-4
            np.testing.assert_allclose(result["metrics"]["loss"], record["loss"], rtol=tol)
            assert result["metrics"]["perplexity"] == pytest.approx(np.exp(record["loss"]),
                                                                    rel=1e-4)


def test_evaluate_base_model_differs_from_adapter(sft_run, tiny_llama_dir, data, capsys):
    """Without --adapter the base model is evaluated (the trained adapter lowered the loss)."""
    prog, spec = BACKENDS["mlx"]
    assert run_cli(prog, spec, ["evaluate", "sft", "--model", str(tiny_llama_dir), "--data",
                                str(data / "sft"), *COMMON]) == 0
    base = json.loads(capsys.readouterr().out)["metrics"]["loss"]
    assert base > _records(sft_run, "test")[-1]["loss"] + 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--init-adapter", "{missing}"], "no such directory"),
    (["--init-adapter", "{sft}", "--fine-tune-type", "dora"], "--fine-tune-type lora"),
    (["--init-adapter", "{model}"], "pass it as --model"),
])
def test_bad_init_adapter_stops_before_training(argv, message, sft_run, tiny_llama_dir, data,
                                                tmp_path, capsys):
    subs = {"{missing}": str(tmp_path / "nope"), "{sft}": str(sft_run / "adapters"),
            "{model}": str(tiny_llama_dir)}
    run = tmp_path / "run"
    assert _run("mlx", "dpo", tiny_llama_dir, data / "pref", run,
                *[subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()
