"""The GRPO family end to end on the tiny model: both CLIs, metrics, checkpoints, and the
cross-backend parity of the policy loss and its gradient on fixed completions."""

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
def odd_sum(prompts, completions, completion_ids=None, answer=None, **kwargs):
    """1 when the completion's token ids sum to an odd number: random, but a pure function of
    the sample."""
    return [float(sum(ids) % 2) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "answer": w} for w in WORDS]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (d / "reward.py").write_text(REWARD)
    return d


def _argv(algo, model, data, run_dir, *extra):
    return [algo, "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
            "--reward", f"{data / 'reward.py'}:odd_sum", "--steps", "2",
            "--prompts-per-step", "2", "--num-generations", "4", "--batch-size", "3",
            "--max-completion-length", "6", "--max-length", "48", "--learning-rate", "1e-2",
            "--no-progress", "--dtype", "float32", "--temperature", "1.5", *extra]


def _records(run_dir, split="train"):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_grpo_runs_logs_and_saves(backend, tiny_llama_dir, rl_data, tmp_path):
    prog, spec = BACKENDS[backend]
    run = tmp_path / "run"
    assert run_cli(prog, spec, _argv("grpo", tiny_llama_dir, rl_data, run,
                                     "--num-iterations", "2", "--log-completions-every", "1",
                                     "--learning-rate", "5e-2")) == 0
    first, second = _records(run)
    for key in ("loss", "reward", "reward_std", "rewards/odd_sum/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/max_length", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "kl", "entropy", "time/generation", "time/scoring",
                "time/update", "tokens_per_second", "grad_norm"):
        assert key in first, key
    assert first["entropy"] > 0 and np.isfinite(first["loss"])
    assert "reward" not in second  # one generation batch served both steps (mu = 2)
    assert first["ratio/mean"] == pytest.approx(1.0, abs=1e-5)  # iteration 1: pi == pi_old
    assert second["ratio/mean"] != pytest.approx(1.0, abs=1e-4)  # iteration 2: it moved
    assert first["clip_ratio/region_mean"] == 0 and second["clip_ratio/region_mean"] > 0
    (valid,) = _records(run, "valid")
    assert "rewards/odd_sum/mean" in valid
    samples = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "completion", "rewards", "advantage"} <= set(samples[0])
    assert (run / "adapters").is_dir() and (run / "checkpoints" / "step_000002").is_dir()


def test_presets_set_their_defaults_and_errors_come_first(tiny_llama_dir, rl_data, tmp_path,
                                                          capsys):
    resolved = {}
    for algo in ("grpo", "dr_grpo", "dapo", "gspo"):
        cfg = build_config(algorithms()[algo].config_cls, ["--data", "x", "--reward", "r"], algo)
        resolved[algo] = (cfg.loss_type, cfg.scale_rewards, cfg.importance_sampling_level)
    assert resolved == {"grpo": ("grpo", "group", "token"), "dr_grpo": ("dr_grpo", "none", "token"),
                        "dapo": ("dapo", "group", "token"), "gspo": ("grpo", "group", "sequence")}
    # a broken reward spec fails before the model loads (exit 2, no traceback)
    argv = _argv("grpo", tiny_llama_dir, rl_data, tmp_path / "r")
    argv[argv.index("--reward") + 1] = "math_answr"
    assert run_cli("mlx_ft", BACKENDS["mlx"][1], argv) == 2
    err = capsys.readouterr().err
    assert "did you mean 'math_answer'" in err and "mlx_ft: device" not in err


def _fixed_batch(tokenizer):
    """Two prompt+completion rows of different lengths, with advantages and perturbed
    old / reference log-probs (so ratios differ from 1 and the KL term is non-zero)."""
    rng = np.random.default_rng(0)
    ids = np.zeros((2, 9), np.int32)
    ids[0, :9] = rng.integers(3, 300, 9)
    ids[1, :7] = rng.integers(3, 300, 7)
    seg = np.zeros_like(ids)
    seg[0, :9], seg[1, :7] = 1, 1
    targets = np.zeros_like(ids)
    targets[0, :8], targets[1, :6] = ids[0, 1:9], ids[1, 1:7]
    mask = np.zeros(ids.shape, np.float32)
    mask[0, 3:8], mask[1, 2:6] = 1, 1
    return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg,
            "advantages": np.array([0.8, -1.1], np.float32), "temperature": np.float32(0.9),
            "num_items": np.float32(12.0), "micro_fraction": np.float32(0.5)}


def _grads(backend, name):
    if name == "mlx":
        from mlx.utils import tree_flatten

        from mlx_ft.model import to_canonical
        return to_canonical(dict(tree_flatten(backend._grads)), backend.cfg.fine_tune_type)
    return {k: p.grad.detach().numpy().copy() for k, p in backend.params.items()}


VARIANTS = {
    "grpo": ("grpo", []), "bnpo": ("grpo", ["--loss-type", "bnpo"]),
    "dr_grpo": ("grpo", ["--loss-type", "dr_grpo"]),
    "dapo": ("grpo", ["--loss-type", "dapo", "--epsilon-high", "0.28"]),
    "gspo": ("grpo", ["--importance-sampling-level", "sequence", "--epsilon", "3e-4",
                      "--epsilon-high", "4e-4"]),
    "delta": ("grpo", ["--delta", "1.5"]),
    # the entropy bonus differentiates through the entropy (the checkpointed head path)
    "entropy_bonus": ("grpo", ["--entropy-coef", "0.05", "--kl-estimator", "k2"]),
    "top_entropy": ("grpo", ["--top-entropy-quantile", "0.5"]),
    "rloo": ("rloo", ["--beta", "0"]),
    "rloo_kl_loss": ("rloo", ["--kl-penalty", "loss", "--kl-estimator", "k1"]),
    "reinforce_pp": ("reinforce_pp", []),
    "ppo": ("ppo", ["--entropy-coef", "0.01"]),
    "cispo": ("grpo", ["--loss-type", "cispo", "--epsilon-high", "0.3"]),
    "sapo": ("grpo", ["--loss-type", "sapo"]),
    "luspo": ("gspo", ["--loss-type", "luspo"]),
    "vespo": ("grpo", ["--loss-type", "vespo", "--use-bias-correction-kl"]),
}


def _variant_batch(name, tokenizer, backend):
    """The fixed batch, with per-token advantages, returns and rollout-time values for the
    token-level estimators, and a high-entropy mask for top_entropy."""
    batch = _fixed_batch(tokenizer)
    rng = np.random.default_rng(2)
    shape = batch["input_ids"].shape
    if name in ("reinforce_pp", "ppo"):
        batch["advantages"] = (rng.normal(0, 1, shape) * batch["loss_mask"]).astype(np.float32)
    if name == "ppo":
        batch["old_values"] = rng.normal(0, 0.1, shape).astype(np.float32)
        batch["returns"] = (batch["old_values"] + rng.normal(0, 0.5, shape)).astype(np.float32)
    if name == "top_entropy":
        batch["entropy_mask"] = (rng.random(shape) < 0.5).astype(np.float32)
    return batch


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_and_gradient_match_across_backends(variant, tiny_llama_dir, tiny_tokenizer):
    algo, flags = VARIANTS[variant]
    spec = algorithms()[algo]
    cfg = build_config(spec.config_cls, ["--data", "x", "--reward", "r", "--dtype", "float32",
                                         "--max-completion-length", "8", *flags], "t")
    loss_fn = spec.make_loss(cfg)
    results = {}
    for name, (_, backend_spec) in BACKENDS.items():
        backend = load_backend_class(backend_spec)(cfg, tiny_llama_dir, tiny_tokenizer)
        batch = _variant_batch(variant, tiny_tokenizer, backend)
        # one plain step first, so LoRA B != 0 and every adapter matrix has a gradient
        warm = dict(batch, advantages=np.sign(batch["advantages"]).astype(np.float32),
                    ref_per_token_logps=backend.per_token_logps(batch))
        backend.forward_backward(warm, loss_fn)
        backend.optimizer_step(5e-2, 0.0)
        logps = backend.per_token_logps(batch)
        perturb = np.random.default_rng(1).normal(0, 0.3, logps.shape).astype(np.float32)
        arrays = dict(batch, old_per_token_logps=logps + perturb,
                      ref_per_token_logps=backend.reference_per_token_logps(batch))
        metrics = backend.forward_backward(arrays, loss_fn)
        results[name] = (metrics, _grads(backend, name))
    (m_mlx, g_mlx), (m_torch, g_torch) = results["mlx"], results["torch"]
    assert set(m_mlx) == set(m_torch)
    for key in m_mlx:  # fp32: the squared value error and exp(sum of log-ratios) amplify noise
        assert m_mlx[key] == pytest.approx(m_torch[key], rel=3e-5, abs=1e-6), key
    assert m_mlx["entropy"] > 0 and m_mlx.get("clip_ratio/region_mean", 0) >= 0
    if cfg.beta > 0 and cfg.kl_penalty == "loss":
        assert abs(m_mlx["kl"]) > 0  # k1 can be negative
    assert set(g_mlx) == set(g_torch)
    assert ("v_head.weight" in g_mlx) == (variant == "ppo")
    # 2e-5 (or 5e-5 of the largest entry), and 1e-3 of the tensor norm. Float32 rounding: over
    # these 450 tensors the 90th percentile of max|diff| is ~2.5e-6 with either MLX's exp or
    # mlx_ft.fastmath's, the single largest entry moves between 0.5e-5 and 1.6e-5 with them.
    for key in g_mlx:
        atol = max(2e-5, 5e-5 * np.abs(g_torch[key]).max())
        np.testing.assert_allclose(g_mlx[key], g_torch[key], atol=atol, rtol=0, err_msg=key)
        error = np.linalg.norm(g_mlx[key] - g_torch[key]) / np.linalg.norm(g_torch[key])
        assert error < 1e-3, (key, error)
    assert all(np.abs(g).max() > 0 for g in g_mlx.values())


def test_resume_samples_and_trains_as_an_uninterrupted_run(tiny_llama_dir, rl_data, tmp_path):
    prog, spec = BACKENDS["mlx"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["--log-completions-every", "0", "--beta", "0"]
    assert run_cli(prog, spec, _argv("grpo", tiny_llama_dir, rl_data, whole, *args,
                                     "--steps", "4", "--save-every", "2")) == 0
    assert run_cli(prog, spec, _argv("grpo", tiny_llama_dir, rl_data, split, *args)) == 0
    assert run_cli(prog, spec, _argv("grpo", tiny_llama_dir, rl_data, split, *args,
                                     "--steps", "4", "--resume")) == 0
    want = [(r["step"], r["reward"], r["loss"]) for r in _records(whole)]
    got = [(r["step"], r["reward"], r["loss"]) for r in _records(split)]
    assert [w[0] for w in want] == [1, 2, 3, 4] and [g[0] for g in got] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(got)[:, 1:], np.array(want)[:, 1:], rtol=1e-5, atol=1e-7)
