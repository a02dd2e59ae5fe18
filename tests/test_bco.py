"""BCO (unpaired) and BCO's running reward mean delta, also offered to DPO's bco_pair: the loss
by hand, the delta's updates by hand, the hook that keeps it (train steps fold, evaluation
reads), both CLIs (same curves on MLX and torch), and a resumed run equal to an uninterrupted
one, delta included (regression: a delta not saved in the checkpoint restarts at 0)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from algorithms.cli import run_cli
from algorithms.ops import NumpyOps
from algorithms.preference.bco import BCOConfig, RunningMean, make_loss, running_delta

BETA = 0.1
# four rows of 2 loss tokens: sequence log-probs (policy, reference) and labels
LOGP = np.array([[-1.0, -2.0], [-0.5, -0.25], [-3.0, -1.0], [-0.2, -0.4]])
REF = np.array([[-1.5, -2.5], [-0.5, -0.5], [-2.0, -1.5], [-1.0, -0.1]])
LABEL = np.array([1.0, 0.0, 1.0, 0.0])
MASK = np.ones_like(LOGP)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _batch(**extra):
    return {"loss_mask": MASK, "label": LABEL, "ref_per_token_logps": REF, **extra}


@pytest.mark.parametrize("delta", [0.0, 0.03, -0.2])
def test_loss_by_hand(delta):
    r = BETA * (LOGP.sum(1) - REF.sum(1))          # 0.1, 0.025, -0.05, 0.05
    want = np.mean([-_log_sigmoid(r[0] - delta), -_log_sigmoid(-(r[1] - delta)),
                    -_log_sigmoid(r[2] - delta), -_log_sigmoid(-(r[3] - delta))])
    cfg = BCOConfig(data="x")
    extra = {"bco_reward_mean": np.float64(delta), "micro_fraction": np.float64(0.5)}
    loss, metrics = make_loss(cfg)(NumpyOps(), LOGP, _batch(**extra))
    assert float(loss) == pytest.approx(0.5 * want, rel=1e-12)
    assert float(metrics["bco/batch_reward_mean"]) == pytest.approx(r.mean(), rel=1e-12)
    assert float(metrics["bco/delta"]) == pytest.approx(delta)
    assert float(metrics["rewards/chosen"]) == pytest.approx((r[0] + r[2]) / 2)
    assert float(metrics["rewards/margin"]) == pytest.approx((r[0] + r[2] - r[1] - r[3]) / 2)


def test_loss_without_delta_is_delta_zero():
    cfg = BCOConfig(data="x")
    plain, _ = make_loss(cfg)(NumpyOps(), LOGP, _batch())
    zero, _ = make_loss(cfg)(NumpyOps(), LOGP, _batch(bco_reward_mean=np.float64(0.0)))
    assert float(plain) == float(zero)


def test_running_mean_updates_by_hand():
    running = RunningMean()
    running.update(0.5, 4)                    # 4 rewards of mean 0.5
    assert running.mean == 0.5 and running.count == 4
    running.update(-1.0, 2)                   # (4 x 0.5 + 2 x -1) / 6
    assert running.mean == pytest.approx(0.0) and running.count == 6
    running.update(3.0, 0)                    # an empty step changes nothing
    running.update(0.6, 4)                    # (0 + 2.4) / 10
    assert running.mean == pytest.approx(0.24) and running.count == 10
    copy = RunningMean()
    copy.load_state_dict(json.loads(json.dumps(running.state_dict())))
    assert (copy.mean, copy.count) == (running.mean, running.count)
    with pytest.raises(ValueError, match="bco_delta_mean"):
        RunningMean().load_state_dict({})


class _FakeBackend:
    """evaluate() returns the batch's reward mean from its own ``reward`` key."""

    def evaluate(self, batch, loss):
        return {"bco/batch_reward_mean": float(batch["reward"])}


def test_the_hook_folds_train_steps_and_only_reads_in_evaluation():
    train_plan, valid_plan = object(), object()
    data = type("Data", (), {"train": train_plan, "valid": valid_plan})()
    seen = []
    make = running_delta(lambda cfg, backend, data, path: lambda *args: seen.append(args),
                         loss=None)
    hook = make(None, None, data, None)
    # step 1: micro-batches of 2 and 1 rows, rewards 0.3 and 0.9: delta = (0.6 + 0.9) / 3
    step = [{"input_ids": np.zeros((2, 3)), "reward": 0.3},
            {"input_ids": np.zeros((1, 3)), "reward": 0.9}]
    hook(_FakeBackend(), step, [None, None], train_plan)
    assert [a["bco_reward_mean"] for a in step] == pytest.approx([0.5, 0.5])
    assert len(seen) == 1  # the inner hook (reference log-probs) ran first
    # evaluation reads the delta and leaves it alone
    valid = [{"input_ids": np.zeros((4, 3)), "reward": 100.0}]
    hook(_FakeBackend(), valid, [None], valid_plan)
    assert valid[0]["bco_reward_mean"] == pytest.approx(0.5)
    # step 2: one batch of 3 at -0.5: (1.5 - 1.5) / 6 = 0
    step2 = [{"input_ids": np.zeros((3, 3)), "reward": -0.5}]
    hook(_FakeBackend(), step2, [None], train_plan)
    assert step2[0]["bco_reward_mean"] == pytest.approx(0.0, abs=1e-7)
    assert hook.state.count == 6


# -- end to end ---------------------------------------------------------------------------------

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("bco")
    rows = [{"prompt": f"say {w}", "completion": f" {w} {w}" if i % 3 else f" no {w}",
             "label": bool(i % 3)} for i, w in enumerate(WORDS * 2)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return d


def _argv(algo, model, data, run_dir, *extra):
    return [algo, "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
            "--batch-size", "4", "--max-length", "32", "--learning-rate", "2e-2",
            "--no-progress", "--dtype", "float32", "--seed", "3", *extra]


def _train(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def test_bco_same_curves_on_both_backends(tiny_llama_dir, data, tmp_path):
    curves = {}
    for backend, (prog, spec) in BACKENDS.items():
        run = tmp_path / backend
        assert run_cli(prog, spec, _argv("bco", tiny_llama_dir, data, run, "--steps", "3")) == 0
        train = _train(run)
        deltas = [r["bco/delta"] for r in train]
        assert deltas[0] == pytest.approx(train[0]["bco/batch_reward_mean"], abs=1e-7)
        assert len(set(np.round(deltas, 9))) == 3  # it moves with the policy's rewards
        state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json")
                           .read_text())["algorithm_state"]
        assert state["bco_delta_count"] == 12
        curves[backend] = [(r["loss"], r["bco/delta"], r["rewards/margin"]) for r in train]
    np.testing.assert_allclose(curves["mlx"], curves["torch"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo,extra", [("bco", ()),
                                        ("dpo", ("--loss-type", "bco_pair",
                                                 "--bco-running-delta"))])
def test_resume_equals_an_uninterrupted_run_delta_included(algo, extra, tiny_llama_dir, data,
                                                           tmp_path):
    from safetensors.numpy import load_file

    prog, spec = BACKENDS["torch"]
    if algo == "dpo":
        rows = [{"prompt": f"say {w}", "chosen": f" {w} {w}", "rejected": f" no {w}"}
                for w in WORDS]
        data = tmp_path / "pairs"
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(prog, spec, _argv(algo, tiny_llama_dir, data, whole, *extra, "--steps", "4",
                                     "--save-every", "2")) == 0
    assert run_cli(prog, spec, _argv(algo, tiny_llama_dir, data, split, *extra,
                                     "--steps", "2")) == 0
    assert run_cli(prog, spec, _argv(algo, tiny_llama_dir, data, split, *extra, "--steps", "4",
                                     "--resume")) == 0
    want, got = _train(whole), _train(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "bco/batch_reward_mean"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-6)
    if algo == "bco":
        np.testing.assert_allclose([r["bco/delta"] for r in got],
                                   [r["bco/delta"] for r in want], rtol=1e-6)
    a = load_file(str(whole / "checkpoints" / "step_000004" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_000004" / "trainable.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_bco_running_delta_needs_bco_pair(tiny_llama_dir, data, tmp_path, capsys):
    prog, spec = BACKENDS["mlx"]
    assert run_cli(prog, spec, _argv("dpo", tiny_llama_dir, data, tmp_path / "r",
                                     "--bco-running-delta")) == 2
    assert "--bco-running-delta=True" in capsys.readouterr().err


def test_loss_and_gradient_match_across_backends(tiny_llama_dir, tiny_tokenizer):
    """Fixed rows, float32: the BCO loss (with a delta) and every gradient agree between MLX
    and torch, non-zero."""
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    from mlx.utils import tree_flatten

    from algorithms.cli import load_backend_class
    from mlx_ft.model import to_canonical

    rng = np.random.default_rng(0)
    lengths = [9, 6, 8, 5]
    ids = np.zeros((4, 9), np.int32)
    targets, seg = np.zeros_like(ids), np.zeros_like(ids)
    mask = np.zeros(ids.shape, np.float32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, 300, n)
        targets[r, :n - 1], seg[r, :n] = ids[r, 1:n], 1
        mask[r, 3:n - 1] = 1
    batch = {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg,
             "label": np.array([1, 0, 1, 0], np.float32), "micro_fraction": np.float32(1.0),
             "bco_reward_mean": np.float32(0.02)}
    cfg = BCOConfig(data="x", dtype="float32", beta=0.5)
    results = {}
    for name, spec in {"mlx": "mlx_ft.backend:MLXBackend",
                       "torch": "cuda_ft.backend:TorchBackend"}.items():
        backend = load_backend_class(spec)(cfg, tiny_llama_dir, tiny_tokenizer)
        warm = dict(batch, ref_per_token_logps=backend.per_token_logps(batch) - 0.05)
        backend.forward_backward(warm, make_loss(cfg))  # LoRA B != 0 afterwards
        backend.optimizer_step(5e-2, 0.0)
        arrays = dict(batch, ref_per_token_logps=backend.reference_per_token_logps(batch))
        metrics = backend.forward_backward(arrays, make_loss(cfg))
        grads = (to_canonical(dict(tree_flatten(backend._grads)), "lora") if name == "mlx"
                 else {k: p.grad.detach().numpy().copy() for k, p in backend.params.items()})
        results[name] = (metrics, grads)
    (m_mlx, g_mlx), (m_torch, g_torch) = results["mlx"], results["torch"]
    for key in m_mlx:
        assert m_mlx[key] == pytest.approx(m_torch[key], rel=3e-5, abs=3e-5), key
    assert abs(m_torch["bco/batch_reward_mean"]) > 0
    for key in g_mlx:
        atol = max(1e-7, 5e-5 * np.abs(g_torch[key]).max())
        np.testing.assert_allclose(g_mlx[key], g_torch[key], atol=atol, rtol=0, err_msg=key)
        assert np.abs(g_torch[key]).max() > 0, key
