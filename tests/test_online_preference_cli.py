"""Online DPO, XPO and Nash-MD end to end on the tiny model through both CLIs: they run, log
what their users watch, write their pairs to completions.jsonl; a resumed run equals an
uninterrupted one; and with fixed completions the loss and every gradient agree between MLX
and torch (float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from algorithms.cli import load_backend_class, run_cli
from algorithms.config import build_config
from algorithms.registry import algorithms

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]
REWARD = '''
def mod3(prompts, completions, completion_ids=None, **kwargs):
    return [float(sum(ids) % 3) for ids in completion_ids]
'''
KEYS = {
    "online_dpo": ("scores/chosen", "scores/rejected", "scores/margin", "rewards/chosen",
                   "rewards/rejected", "rewards/margin", "rewards/accuracy", "loss/dpo"),
    "xpo": ("scores/policy", "scores/reference", "win_rate", "rewards/margin", "loss/xpo",
            "completions/reference_mean_length"),
    "nash_md": ("scores/policy", "scores/mixture", "win_rate", "preference/mean", "loss/score",
                "loss/kl", "completions/mixture_mean_length"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("online_pref")
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}]} for w in WORDS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (d / "reward.py").write_text(REWARD)
    return d


def _argv(algo, model, data, run_dir, *extra):
    return [algo, "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
            "--reward", f"{data / 'reward.py'}:mod3", "--prompts-per-step", "3",
            "--batch-size", "2", "--max-completion-length", "6", "--max-length", "48",
            "--learning-rate", "2e-2", "--no-progress", "--dtype", "float32",
            "--temperature", "1.3", "--log-completions-every", "1", *extra]


def _records(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("algo", list(KEYS))
def test_runs_logs_and_writes_pairs(algo, backend, tiny_llama_dir, data, tmp_path):
    prog, spec = BACKENDS[backend]
    run = tmp_path / algo
    assert run_cli(prog, spec, _argv(algo, tiny_llama_dir, data, run, "--steps", "2",
                                     "--missing-eos-penalty", "0.5")) == 0
    first, second = _records(run)
    for key in ("loss", "reward", "rewards/mod3/mean", "rewards/missing_eos_penalty/mean",
                "kl", "completions/mean_length", "completions/eos_ratio", "pairs/unscored",
                "grad_norm", *KEYS[algo]):
        assert key in first, key
    assert np.isfinite(first["loss"]) and first["grad_norm"] > 0
    assert abs(first["kl"]) < 1e-5  # step 1: the policy is the reference
    assert second["kl"] != 0         # then it moved
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 8  # 2 pairs x 2 completions x 2 steps
    second_source = {"online_dpo": "policy", "xpo": "reference", "nash_md": "mixture"}[algo]
    assert [s["sampled_from"] for s in samples[:2]] == ["policy", second_source]
    if algo == "nash_md":
        assert 0 < samples[0]["preference"] < 1
    else:  # exactly one completion of a scored pair is chosen, the higher-rewarded one
        pair = samples[:2]
        assert sum(s["chosen"] for s in pair) == 1
        chosen = next(s for s in pair if s["chosen"])
        assert chosen["reward"] == max(s["reward"] for s in pair)
    (valid,) = _records(run, "valid")
    assert "reward" in valid
    assert (run / "adapters").is_dir()


def test_resume_equals_an_uninterrupted_run(tiny_llama_dir, data, tmp_path):
    from safetensors.numpy import load_file

    prog, spec = BACKENDS["mlx"]
    args = ["--log-completions-every", "0", "--num-iterations", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(prog, spec, _argv("xpo", tiny_llama_dir, data, whole, *args, "--steps", "4",
                                     "--save-every", "2")) == 0
    assert run_cli(prog, spec, _argv("xpo", tiny_llama_dir, data, split, *args,
                                     "--steps", "2")) == 0
    assert run_cli(prog, spec, _argv("xpo", tiny_llama_dir, data, split, *args, "--steps", "4",
                                     "--resume")) == 0
    want = [(r["step"], r["loss"], r["rewards/margin"]) for r in _records(whole)]
    got = [(r["step"], r["loss"], r["rewards/margin"]) for r in _records(split)]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-8)
    a = load_file(str(whole / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000004" / "trainable.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_config_errors_name_the_flag(tiny_llama_dir, data, tmp_path, capsys):
    prog, spec = BACKENDS["mlx"]
    for algo, extra, flag in (("xpo", ["--alpha", "-1"], "--alpha"),
                              ("nash_md", ["--mixture-coef", "1.5"], "--mixture-coef"),
                              ("online_dpo", ["--num-mini-batches", "9"], "--num-mini-batches"),
                              ("online_dpo", ["--beta", "0"], "--beta")):
        assert run_cli(prog, spec, _argv(algo, tiny_llama_dir, data, tmp_path / "x",
                                         *extra)) == 2
        assert flag in capsys.readouterr().err


# -- cross-backend parity on fixed pairs ----------------------------------------------------

def _fixed_pairs(n_pairs=3):
    """``n_pairs`` pairs (2n rows: chosen first, then rejected) of random prompts and
    completions of different lengths, with Nash-MD's preference and XPO's row flags."""
    rng = np.random.default_rng(0)
    rows = 2 * n_pairs
    lengths = [9, 6, 8, 4, 7, 5][:rows]
    width = max(lengths)
    ids = np.zeros((rows, width), np.int32)
    targets, seg = np.zeros_like(ids), np.zeros_like(ids)
    mask = np.zeros(ids.shape, np.float32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, 300, n)
        targets[r, :n - 1] = ids[r, 1:n]
        seg[r, :n] = 1
        mask[r, 3:n - 1] = 1
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "pair_weight": np.array([1, 1, 0][:n_pairs], np.float32),
            "from_second": np.array([0, 1, 0, 1, 0, 1][:rows], np.float32),
            "preference": rng.uniform(0.1, 0.9, rows).astype(np.float32),
            "micro_fraction": np.float32(0.5)}


VARIANTS = {"online_dpo": ("online_dpo", []), "ipo": ("online_dpo", ["--loss-type", "ipo"]),
            "xpo": ("xpo", ["--alpha", "0.05"]), "nash_md": ("nash_md", []),
            "nash_md_token": ("nash_md", ["--kl-level", "token"])}


def _grads(backend, name):
    if name == "mlx":
        from mlx.utils import tree_flatten

        from mlx_ft.model import to_canonical
        return to_canonical(dict(tree_flatten(backend._grads)), backend.cfg.fine_tune_type)
    return {k: p.grad.detach().numpy().copy() for k, p in backend.params.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_gradient_match_across_backends(variant, tiny_llama_dir, tiny_tokenizer):
    algo, flags = VARIANTS[variant]
    spec = algorithms()[algo]
    cfg = build_config(spec.config_cls, ["--data", "x", "--reward", "r", "--dtype", "float32",
                                         *flags], "t")
    loss_fn = spec.make_loss(cfg)
    results = {}
    for name, (_, backend_spec) in BACKENDS.items():
        backend = load_backend_class(backend_spec)(cfg, tiny_llama_dir, tiny_tokenizer)
        batch = _fixed_pairs()
        # one step first, so LoRA B != 0, the policy leaves the reference and every adapter
        # matrix has a gradient
        warm = dict(batch, ref_per_token_logps=backend.per_token_logps(batch) - 0.1)
        backend.forward_backward(warm, loss_fn)
        backend.optimizer_step(5e-2, 0.0)
        arrays = dict(batch, ref_per_token_logps=backend.reference_per_token_logps(batch))
        results[name] = (backend.forward_backward(arrays, loss_fn), _grads(backend, name))
    (m_mlx, g_mlx), (m_torch, g_torch) = results["mlx"], results["torch"]
    assert set(m_mlx) == set(m_torch)
    # differences of ~-30 sequence log-probs (kl, rewards) carry their float32 rounding
    scale = max(1.0, *(abs(m_torch.get(k, 0.0)) for k in ("logps/chosen", "logps/rejected",
                                                           "logps/policy")))
    for key in m_mlx:
        assert m_mlx[key] == pytest.approx(m_torch[key], rel=3e-5, abs=1e-6 * scale), key
    assert abs(m_mlx["kl"]) > 0
    assert set(g_mlx) == set(g_torch)
    for key in g_mlx:
        atol = max(1.5e-5, 5e-5 * np.abs(g_torch[key]).max())
        np.testing.assert_allclose(g_mlx[key], g_torch[key], atol=atol, rtol=0, err_msg=key)
        error = np.linalg.norm(g_mlx[key] - g_torch[key]) / np.linalg.norm(g_torch[key])
        assert error < 1e-3, (key, error)
    assert all(np.abs(g).max() > 0 for g in g_mlx.values())


def test_evaluate_scores_the_trained_policy(tiny_llama_dir, data, tmp_path, capsys):
    """``evaluate --run`` on an online DPO run samples one completion per prompt with the
    loop's evaluation seed and scores it: the reward the loop logged for the split at the end."""
    prog, spec = BACKENDS["mlx"]
    run = tmp_path / "odpo"
    assert run_cli(prog, spec, _argv("online_dpo", tiny_llama_dir, data, run, "--steps", "2")) == 0
    capsys.readouterr()
    assert run_cli(prog, spec, ["evaluate", "--run", str(run), "--split", "valid"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["algorithm"] == "online_dpo"
    last = _records(run, "valid")[-1]
    np.testing.assert_allclose(result["metrics"]["reward"], last["reward"], rtol=1e-6)
