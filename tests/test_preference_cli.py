"""Preference algorithms end to end (``python -m mlx_ft dpo ...`` in-process) on both backends:
same losses on MLX and torch, metrics logged, reference handling, and learning on a rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon", "star", "fish"]
ALGOS = ["dpo", "cpo", "simpo", "orpo", "kto"]


def _pairs(path, words, seed):
    """The rule: chosen repeats the word; rejected names another word once, after "not"."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in words:
        other = words[int(rng.integers(len(words)))]
        other = other if other != w else "no"
        rows.append({"prompt": [{"role": "user", "content": f"say {w}"}],
                     "chosen": [{"role": "assistant", "content": f"{w} {w}"}],
                     "rejected": [{"role": "assistant", "content": f"not {other}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    _pairs(d / "train.jsonl", WORDS * 2, 0)
    _pairs(d / "valid.jsonl", WORDS[:6], 1)
    return d


def _run(backend, algo, model, data, run_dir, *extra):
    prog, spec = BACKENDS[backend]
    argv = [algo, "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
            "--steps", "3", "--batch-size", "4", "--max-length", "48", "--learning-rate", "5e-3",
            "--no-progress", "--dtype", "float32", *extra]
    return run_cli(prog, spec, argv)


def _records(run_dir, split):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.parametrize("algo, extra", [(a, ()) for a in ALGOS] + [
    ("dpo", ("--use-weighting",)), ("dpo", ("--loss-type", "ipo", "sft", "--loss-weights", "1",
                                            "0.5", "--ld-alpha", "0.5")),
    ("orpo", ("--nll-include-prompt",)), ("kto", ("--loss-type", "apo_zero_unpaired"))])
def test_same_losses_on_both_backends(algo, extra, tiny_llama_dir, pref_data, tmp_path):
    curves = {}
    for backend in BACKENDS:
        assert _run(backend, algo, tiny_llama_dir, pref_data, tmp_path / backend, *extra) == 0
        train = _records(tmp_path / backend, "train")
        assert [r["step"] for r in train] == [1, 2, 3]
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin",
                    "logps/chosen", "grad_norm"):
            if algo == "kto" and key in ("rewards/margin",):
                continue
        if "--use-weighting" in extra:
            assert all(0 < r["wpo/weight"] < 1 for r in train)
            assert all(np.isfinite(r[key]) for r in train), (algo, key)
        assert all(r["grad_norm"] > 0 for r in train)
        valid = _records(tmp_path / backend, "valid")
        assert valid and np.isfinite(valid[-1]["loss"])
        curves[backend] = [r["loss"] for r in train] + [valid[-1]["loss"]]
    np.testing.assert_allclose(curves["mlx"], curves["torch"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", ["dpo", "orpo", "kto"])
def test_learning_raises_preference_accuracy_and_margin(algo, tiny_llama_dir, pref_data, tmp_path):
    run = tmp_path / "run"
    assert _run("mlx", algo, tiny_llama_dir, pref_data, run, "--steps", "30", "--eval-every",
                "30", "--learning-rate", "1e-2") == 0
    # Validation at step 0 is the untrained model: evaluate it with a zero-step run.
    start = tmp_path / "start"
    assert _run("mlx", algo, tiny_llama_dir, pref_data, start, "--steps", "1",
                "--learning-rate", "0") == 0
    before, after = _records(start, "valid")[-1], _records(run, "valid")[-1]
    if algo == "kto":  # unpaired: desirable rewards up, undesirable down
        assert after["rewards/chosen"] - after["rewards/rejected"] > \
            before["rewards/chosen"] - before["rewards/rejected"] + 0.01
    else:
        assert after["rewards/accuracy"] > before["rewards/accuracy"]
        assert after["rewards/margin"] > before["rewards/margin"] + 0.01
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_precomputed_reference_gives_the_same_run(backend, tiny_llama_dir, pref_data, tmp_path):
    import shutil

    data = tmp_path / "data"  # a private copy: the cache is written beside the data
    shutil.copytree(pref_data, data)
    assert _run(backend, "dpo", tiny_llama_dir, data, tmp_path / "live") == 0
    assert _run(backend, "dpo", tiny_llama_dir, data, tmp_path / "cached",
                "--precompute-ref") == 0
    assert len(list((data / ".posttrain_cache").glob("ref-*.npz"))) == 2  # train and valid
    live = [r["loss"] for r in _records(tmp_path / "live", "train")]
    cached = [r["loss"] for r in _records(tmp_path / "cached", "train")]
    np.testing.assert_allclose(live, cached, rtol=1e-5)


def test_config_errors_before_the_model_loads(tiny_llama_dir, pref_data, tmp_path, capsys):
    assert _run("mlx", "dpo", tiny_llama_dir, pref_data, tmp_path / "a", "--loss-type", "sigmoid",
                "ipo", "--loss-weights", "1") == 2
    assert "--loss-weights" in capsys.readouterr().err
    assert _run("mlx", "dpo", tiny_llama_dir, pref_data, tmp_path / "b", "--packing") == 2
    assert "--packing" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    assert _run("mlx", "dpo", tiny_llama_dir, bad, tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "mlx_ft: device" not in err


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("algo", ALGOS)
def test_every_trainable_group_gets_a_gradient(backend, algo, tiny_llama_dir, pref_data,
                                               tiny_tokenizer):
    from algorithms.cli import load_backend_class
    from algorithms.config import build_config
    from algorithms.loop import collate_step
    from algorithms.registry import algorithms

    spec = algorithms()[algo]
    cfg = build_config(spec.config_cls, ["--data", str(pref_data), "--max-length", "48",
                                         "--fine-tune-type", "dora", "--dtype", "float32"], "t")
    data = spec.prepare_data(cfg, tiny_tokenizer)
    backend_obj = load_backend_class(BACKENDS[backend][1])(cfg, tiny_llama_dir, tiny_tokenizer)
    prepare = spec.make_prepare(cfg, backend_obj, data, tiny_llama_dir)
    loss_fn = spec.make_loss(cfg)
    # Also pins a bug: torch's trainable_parameters() once returned views of the live weights,
    # so "before" silently changed with them.
    before = backend_obj.trainable_parameters()
    # Step 1 moves lora_B and the magnitudes (lora_A's gradient is zero while B == 0); step 2 A.
    for batch in data.train.batches(0)[:2]:
        (arrays,), _ = collate_step(data.train, [batch], backend_obj, prepare, spec.normaliser)
        backend_obj.forward_backward(arrays, loss_fn)
        assert backend_obj.optimizer_step(1e-2, 0.0) > 0
    after = backend_obj.trainable_parameters()
    frozen = [k for k in before if np.array_equal(before[k], after[k])]
    assert not frozen, f"{algo} on {backend}: no gradient reached {frozen[:4]}"
