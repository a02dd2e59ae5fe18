"""The benchmark harness (scripts/bench.py, scripts/benchkit/) and converters/random_init.

The end-to-end test runs a 2-step recipe on a tiny random-init model for every backend this
machine has and checks the JSON (against the schema), the Markdown table and the PNG charts.
No timing is asserted anywhere: benchmark numbers belong in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.random_init import SIZES, count_parameters, make_random_model, parameter_shapes
from scripts.benchkit import measure, parity, settings, synthetic
from scripts.benchkit.recipe import Recipe, block_linear_names, data_fingerprint

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _header(path: Path) -> dict:
    with path.open("rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_random_model(tmp_path_factory.mktemp("rand_tiny"), "tiny", dtype="float32",
                             tokenizer_dir=tiny_tokenizer_dir)


# --- converters.random_init ----------------------------------------------------------------

def test_random_model_is_deterministic_and_sharded(tmp_path, tiny_tokenizer_dir):
    one = make_random_model(tmp_path / "a", "tiny", dtype="bfloat16",
                            tokenizer_dir=tiny_tokenizer_dir, shard_bytes=60_000)
    two = make_random_model(tmp_path / "b", "tiny", dtype="bfloat16",
                            tokenizer_dir=tiny_tokenizer_dir, shard_bytes=60_000)
    shards = sorted(one.glob("model-*.safetensors"))
    assert len(shards) > 1, "a small shard size must split the weights"
    for shard in shards:
        assert shard.read_bytes() == (two / shard.name).read_bytes()
    index = json.loads((one / "model.safetensors.index.json").read_text())
    config = json.loads((one / "config.json").read_text())
    expected = dict(parameter_shapes(SIZES["tiny"], config["vocab_size"], "llama"))
    assert set(index["weight_map"]) == set(expected)
    for shard in shards:
        for name, meta in _header(shard).items():
            if name != "__metadata__":
                assert meta["dtype"] == "BF16" and tuple(meta["shape"]) == expected[name]
    assert (one / "tokenizer.json").is_file() and config["model_type"] == "llama"


def test_random_model_bfloat16_encoding_rounds_to_nearest(tmp_path, tiny_tokenizer_dir):
    """bf16 is written by hand: check the bits against float32 truncation with rounding."""
    from converters import random_init

    x = np.array([1.0, -2.5, 0.1, 3.14159], dtype=np.float32)
    bits = np.frombuffer(random_init._encode(x, "bfloat16"), dtype="<u2")
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(back, x, rtol=2 ** -8)
    assert bits[0] == 0x3F80 and bits[1] == 0xC020  # 1.0 and -2.5 are exact


def test_random_model_sizes_and_errors(tmp_path):
    assert 1.0e9 < count_parameters("1b") < 1.2e9
    assert 1.3e8 < count_parameters("135m") < 1.4e8
    with pytest.raises(ValueError, match="size 'huge'"):
        make_random_model(tmp_path, "huge")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        make_random_model(tmp_path, "tiny", tokenizer_dir=tmp_path)


# --- synthetic data ---------------------------------------------------------------------------

def test_synthetic_lengths_have_a_realistic_spread():
    lengths = synthetic.example_lengths(512, seed=0)
    median = statistics.median(lengths)
    assert 12 <= min(lengths) and max(lengths) <= 380
    assert min(lengths) < median / 2 and max(lengths) > 2 * median  # short head, long tail
    assert statistics.pstdev(lengths) / statistics.fmean(lengths) > 0.4
    assert statistics.fmean(lengths) > median  # right-skewed, like real instruction data


def test_synthetic_files_are_valid_and_deterministic(tmp_path):
    a = synthetic.write_synthetic(tmp_path / "a", "chat", n_train=32, n_valid=4)
    b = synthetic.write_synthetic(tmp_path / "b", "chat", n_train=32, n_valid=4)
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    prefs = synthetic.write_synthetic(tmp_path / "p", "preference", n_train=8, n_valid=2)
    row = json.loads((prefs / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
    with pytest.raises(ValueError, match="kind 'audio'"):
        synthetic.write_synthetic(tmp_path / "x", "audio")


# --- matched settings ---------------------------------------------------------------------------

SETTINGS = {"model": "/m", "data": "abc", "fine_tune_type": "lora", "lora_rank": 8,
            "lora_alpha": 16.0, "target_modules": ["mlp.up_proj", "self_attn.q_proj"],
            "batch_size": 4, "max_length": 512, "steps": 30, "learning_rate": 1e-4,
            "dtype": "float32"}


@pytest.mark.parametrize("key,value", [("lora_alpha", 20.0), ("batch_size", 8),
                                       ("target_modules", ["self_attn.q_proj"]),
                                       ("max_length", 256), ("dtype", "bfloat16")])
def test_matched_settings_check_refuses_and_names_the_setting(key, value):
    other = {**SETTINGS, key: value}
    with pytest.raises(settings.SettingsMismatch, match=rf"settings differ: {key} \("):
        settings.check_matched("mlx-cpu", SETTINGS, "mlx-lm-cpu", other)
    ours = measure.Run("mlx-cpu", "ours", "mlx", "cpu", settings=SETTINGS,
                       summary={"tokens_per_s": 100.0})
    base = measure.Run("mlx-lm-cpu", "mlx-lm", "mlx", "cpu", settings=other,
                       summary={"tokens_per_s": 50.0})
    result = settings.compare(ours, base)
    assert result["status"] == "refused" and key in result["message"]
    assert "tokens_per_s_ratio" not in result


def test_matched_settings_compare_gives_ratios_and_ignores_lora_keys_for_full():
    settings.check_matched("a", SETTINGS, "b", dict(SETTINGS))
    full = {**SETTINGS, "fine_tune_type": "full"}
    settings.check_matched("a", full, "b", {**full, "lora_rank": None})
    with pytest.raises(settings.SettingsMismatch, match="steps \\(not recorded by b\\)"):
        settings.check_matched("a", SETTINGS, "b", {k: v for k, v in SETTINGS.items()
                                                    if k != "steps"})
    ours = measure.Run("mlx-cpu", "ours", "mlx", "cpu", settings=SETTINGS, memory={"peak_rss": 1.0},
                       summary={"tokens_per_s": 150.0})
    base = measure.Run("mlx-lm-cpu", "mlx-lm", "mlx", "cpu", settings=dict(SETTINGS),
                       memory={"peak_rss": 2.0}, summary={"tokens_per_s": 100.0})
    result = settings.compare(ours, base)
    assert result["status"] == "ok"
    assert result["tokens_per_s_ratio"] == pytest.approx(1.5)
    assert result["peak_rss_ratio"] == pytest.approx(0.5)


def test_settings_read_back_from_each_tool_agree(tmp_path, tiny_random):
    """Our config.json and mlx-lm's adapter_config.json, written for the same recipe, normalise
    to the same settings (alpha vs scale, empty targets vs explicit keys)."""
    from scripts.benchkit import run_mlx_lm, run_ours

    data = synthetic.write_synthetic(tmp_path / "data", n_train=8, n_valid=2)
    recipe = Recipe(model=str(tiny_random), steps=5, lora_alpha=32.0)
    config = {"model_path": str(tiny_random), "data": str(data), "fine_tune_type": "lora",
              "lora_rank": 8, "lora_alpha": 32.0, "target_modules": [], "batch_size": 4,
              "max_length": 512, "steps": 5, "learning_rate": 1e-4, "dtype": "auto",
              "algorithm": "sft"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "log.txt").write_text("mlx_ft: device=cpu dtype=float32 (no MLX GPU backend)\n")
    ours = run_ours.read_settings(tmp_path / "config.json", tmp_path / "log.txt")
    yaml_cfg = run_mlx_lm.yaml_config(recipe, tiny_random, data, tmp_path / "adapters")
    assert yaml_cfg["lora_parameters"]["scale"] == 4.0
    assert yaml_cfg["lora_parameters"]["keys"] == block_linear_names(tiny_random)
    (tmp_path / "adapter_config.json").write_text(json.dumps(yaml_cfg))
    theirs = run_mlx_lm.read_settings(tmp_path / "adapter_config.json")
    settings.check_matched("ours", ours, "mlx-lm", theirs)
    # regression: our config.json names the algorithm, so mlx-lm's read-back must too, or
    # every SFT comparison with mlx-lm is refused ("algorithm (not recorded by mlx-lm)")
    ours_run = measure.Run("mlx-cpu", "ours", "mlx", "cpu", settings=ours,
                           summary={"tokens_per_s": 2.0})
    base_run = measure.Run("mlx-lm-cpu", "mlx-lm", "mlx", "cpu", settings=theirs,
                           summary={"tokens_per_s": 1.0})
    assert settings.compare(ours_run, base_run)["status"] == "ok"
    assert ours["data"] == data_fingerprint(data)
    assert len(ours["target_modules"]) == 7  # q k v o gate up down


# --- measurement and parity ---------------------------------------------------------------------

def test_summary_leaves_out_warmup_and_counts_real_tokens():
    records = [{"split": "train", "step": i + 1, "loss": 2.0 - i / 10, "tokens": 100 * (i + 1),
                "step_time": t, "cpu_time": 2 * t} for i, t in enumerate([9.0, 1.0, 2.0, 1.0])]
    records.append({"split": "valid", "step": 4, "loss": 1.5})
    steps = measure.steps_from_metrics(records)
    assert [s["tokens"] for s in steps] == [100, 100, 100, 100]  # cumulative -> per step
    summary = measure.summarize(steps, warmup=1)
    assert summary["measured_steps"] == 3
    assert summary["tokens_per_s"] == pytest.approx(300 / 4.0)
    assert summary["tokens_per_cpu_s"] == pytest.approx(300 / 8.0)
    assert summary["step_time"]["median"] == 1.0 and summary["step_time"]["max"] == 2.0
    assert summary["final_loss"] == pytest.approx(1.7)


def test_summary_time_split_for_rl_metrics():
    records = [{"split": "train", "step": i, "loss": 1.0, "time": 10.0 * i,
                "tokens_per_second": 50.0, "time/generation": 6.0, "time/scoring": 1.0,
                "time/update": 3.0} for i in range(1, 5)]
    summary = measure.summarize(measure.steps_from_metrics(records), warmup=1)
    assert summary["time_split"] == {"time/generation": 6.0, "time/scoring": 1.0,
                                     "time/update": 3.0}
    assert summary["tokens_per_s"] == pytest.approx(50.0)


def test_parity_verdict_on_synthetic_curves():
    ref = [2.0, 1.8, 1.6, 1.5]
    close = [2.0005, 1.799, 1.6015, 1.5]
    off = [2.0, 1.8, 1.7, 1.5]  # step 3 is 0.1 away
    verdict = parity.parity({"": {"mlx-cpu": ref, "torch-cpu": close}}, atol=2e-3)
    assert verdict["verdict"] == "agree"
    verdict = parity.parity({"": {"mlx-cpu": ref, "torch-cpu": off}}, atol=2e-3)
    pair = verdict["groups"]["default"]["pairs"]["torch-cpu"]
    assert verdict["verdict"] == "disagree" and pair["worst_step"] == 3
    assert pair["max_abs_diff"] == pytest.approx(0.1)
    assert parity.parity({"": {"mlx-cpu": ref, "torch-cpu": ref[:3]}}, 1e-3)["verdict"] == \
        "disagree"  # a run that stopped early does not agree
    assert parity.parity({"": {"mlx-cpu": ref}}, 1e-3)["verdict"] == "n/a"
    assert parity.curve_verdict(ref, off, atol=0.0, rtol=0.1)["agree"]


def test_runs_are_paired_with_their_baseline_per_repeat_and_aggregated():
    from scripts.bench import aggregate, pair_comparisons, plan_runs
    from scripts.benchkit.backends import target

    plan = plan_runs([target("mlx-cpu"), target("torch-cpu")], [("", [], {})], ["mlx-lm", "trl"])
    assert [p[0] for p in plan] == ["ours", "ours", "mlx-lm", "trl"]
    assert plan_runs([target("mlx-cpu")], [("", [], {})], ["trl"])[-1] == ("trl", "none")

    def run(name, runner, framework, tps):
        return measure.Run(name, runner, framework, "cpu", settings=SETTINGS,
                           memory={"peak_rss": 1.0}, summary={"tokens_per_s": tps})

    runs = [run("mlx-cpu", "ours", "mlx", 100.0), run("mlx-lm-cpu", "mlx-lm", "mlx", 50.0),
            run("torch-cpu", "ours", "torch", 90.0),
            run("mlx-cpu#2", "ours", "mlx", 120.0), run("mlx-lm-cpu#2", "mlx-lm", "mlx", 40.0)]
    pairs = pair_comparisons(runs)
    assert [(c["ours"], c["baseline"]) for c in pairs] == [("mlx-cpu", "mlx-lm-cpu"),
                                                          ("mlx-cpu#2", "mlx-lm-cpu#2")]
    assert [c["tokens_per_s_ratio"] for c in pairs] == [2.0, 3.0]
    (median,) = aggregate(pairs)
    assert median["ours"] == "mlx-cpu (median of 2)" and median["tokens_per_s_ratio"] == 2.5


def test_kernel_variants_run_on_torch_only_and_pair_with_trl_and_liger():
    from scripts.bench import KERNEL_VARIANTS, pair_comparisons, parse_variant, plan_runs
    from scripts.benchkit.backends import target

    variants = [parse_variant(v) for v in KERNEL_VARIANTS]
    plan = plan_runs([target("mlx-cpu"), target("torch-cpu")], variants, ["trl", "trl-liger"])
    assert [(p[0], getattr(p[1], "name", p[1]), p[2][0] if len(p) > 2 else None) for p in plan] \
        == [("ours", "torch-cpu", "kernels"), ("ours", "torch-cpu", "no-kernels"),
            ("trl", "cpu", None), ("trl-liger", "cpu", None)]
    runs = [measure.Run("torch-cpu[kernels]", "ours", "torch", "cpu", settings=SETTINGS,
                        summary={"tokens_per_s": 3.0}),
            measure.Run("trl-cpu", "trl", "torch", "cpu", settings=SETTINGS,
                        summary={"tokens_per_s": 1.0}),
            measure.Run("trl-liger-cpu", "trl-liger", "torch", "cpu", settings=SETTINGS,
                        summary={"tokens_per_s": 2.0})]
    assert [(c["baseline"], c["tokens_per_s_ratio"]) for c in pair_comparisons(runs)] == \
        [("trl-cpu", 3.0), ("trl-liger-cpu", 1.5)]


def test_variant_parsing():
    from scripts.bench import parse_variant

    assert parse_variant("packed=--packing --logprob-chunk-size 256") == \
        ("packed", ["--packing", "--logprob-chunk-size", "256"], {})
    assert parse_variant("eager=MLX_DISABLE_COMPILE=1") == ("eager", [], {"MLX_DISABLE_COMPILE": "1"})
    with pytest.raises(ValueError, match="LABEL=ARGS"):
        parse_variant("--packing")


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", [["scripts/bench.py"], ["-m", "scripts.bench"]])
def test_both_entry_points_start(entry):
    out = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True,
                         cwd=REPO, check=False)
    assert out.returncode == 0 and "--compare" in out.stdout


def test_two_step_recipe_on_every_backend_writes_json_markdown_png(tmp_path, tiny_random):
    import jsonschema

    from scripts import bench
    from scripts.benchkit import backends
    from scripts.benchkit.report import SCHEMA

    available = [t for t in ("mlx-cpu", "torch-cpu") if t in backends.detect(str(REPO))]
    assert available, "this suite needs mlx or torch"
    out = tmp_path / "bench"
    code = bench.main(["--model", str(tiny_random), "--steps", "2", "--warmup", "1",
                       "--max-length", "64", "--batch-size", "2", "--backends", *available,
                       "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, SCHEMA)
    assert code == 0, results
    assert [r["name"] for r in results["runs"]] == available
    for run in results["runs"]:
        assert run["status"] == "ok", run["message"]
        assert [s["step"] for s in run["steps"]] == [1, 2]
        assert all(s["tokens"] > 0 and s["step_time"] > 0 for s in run["steps"])
        assert run["summary"]["measured_steps"] == 1 and run["summary"]["tokens_per_s"] > 0
        assert run["memory"]["peak_rss"] > 0 and run["settings"]["steps"] == 2
    assert results["machine"]["versions"]["python"]
    if len(available) == 2:
        assert results["parity"]["verdict"] == "agree"
    markdown = (out / "results.md").read_text()
    assert "| run | status | tokens/s |" in markdown
    assert all(f"| {name} | ok |" in markdown for name in available)
    for name in ("throughput.png", "memory.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name


@pytest.mark.slow
def test_compare_mlx_lm_and_trl_side_by_side(tmp_path, tiny_random):
    """--compare runs mlx-lm's trainer (and TRL where importable) with matched settings."""
    from scripts import bench

    out = tmp_path / "bench"
    bench.main(["--model", str(tiny_random), "--steps", "3", "--warmup", "1", "--max-length",
                "64", "--backends", "mlx-cpu", "torch-cpu", "--compare", "mlx-lm", "trl",
                "--out", str(out), "--no-charts"])
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["mlx-lm-cpu"]["status"] == "ok", runs["mlx-lm-cpu"]["message"]
    comparisons = {(c["ours"], c["baseline"]): c for c in results["comparisons"]}
    assert comparisons[("mlx-cpu", "mlx-lm-cpu")]["status"] == "ok"
    assert comparisons[("mlx-cpu", "mlx-lm-cpu")]["tokens_per_s_ratio"] > 0
    if runs["trl-cpu"]["status"] != "skipped":
        assert comparisons[("torch-cpu", "trl-cpu")]["status"] == "ok"


# --- the speed levers keep the numbers ----------------------------------------------------------
# The padding-free layout, the fused head and the CPU streams are measured by the harness; here
# each is pinned to the plain path it replaces: same loss, log-probs and gradients.

def _lever_batch(tiny_tokenizer, tmp_path, packing: bool, temperature: float | None):
    from algorithms.config import TrainConfig
    from algorithms.data import BatchPlan, prepare_dataset

    rows = [[{"role": "user", "content": f"count to {n}"},
             {"role": "assistant", "content": " ".join(str(i) for i in range(n))}]
            for n in (2, 9, 5, 3, 7, 4)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = TrainConfig(data=str(path), max_length=64, packing=packing, batch_size=3,
                      logprob_chunk_size=29, dtype="float32")
    dataset = prepare_dataset(path, "train", tiny_tokenizer, cfg)
    plan = BatchPlan(dataset, cfg.batch_size, cfg.max_length, packing, seed=0)
    batch = plan.collate(plan.batches(0)[0])
    batch["num_items"] = np.float32(batch["loss_mask"].sum())
    batch["micro_fraction"] = np.float32(1.0)
    if temperature is not None:
        batch["temperature"] = np.float32(temperature)
    return cfg, batch


LEVERS_OFF = {"mlx": {"POSTTRAIN_MLX_VARLEN": "0", "POSTTRAIN_MLX_FUSED_HEAD": "0"},
              "torch": {"POSTTRAIN_TORCH_VARLEN": "0"}}


def _loss_grads_logps(backend_name, cfg, model, tokenizer, batch):
    from algorithms.sft import nll_loss

    if backend_name == "mlx":
        from mlx.utils import tree_flatten

        from mlx_ft.backend import MLXBackend

        backend = MLXBackend(cfg, model, tokenizer)
        metrics = backend.forward_backward(batch, nll_loss)
        grads = {k: np.array(v) for k, v in tree_flatten(backend._grads)}
    else:
        from cuda_ft.backend import TorchBackend

        backend = TorchBackend(cfg, model, tokenizer)
        metrics = backend.forward_backward(batch, nll_loss)
        grads = {k: p.grad.numpy().copy() for k, p in backend.params.items()}
    return metrics["loss"], grads, backend.per_token_logps(batch)


@pytest.fixture(scope="module")
def tiny_tied_dir(tmp_path_factory) -> Path:
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True)


@pytest.mark.parametrize("backend_name", ["mlx", "torch"])
@pytest.mark.parametrize("family,packing,temperature", [
    ("llama", False, None), ("llama", True, 0.7), ("qwen2", True, None), ("qwen2", False, 1.3),
    ("tied", True, None)])
def test_fast_paths_match_the_plain_path(backend_name, family, packing, temperature, monkeypatch,
                                         tmp_path, tiny_llama_dir, tiny_qwen2_dir, tiny_tied_dir,
                                         tiny_tokenizer):
    pytest.importorskip("mlx" if backend_name == "mlx" else "torch")
    model = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "tied": tiny_tied_dir}[family]
    cfg, batch = _lever_batch(tiny_tokenizer, tmp_path, packing, temperature)
    if backend_name == "mlx":  # two CPU streams, whatever this machine's core count
        import mlx.core as mx

        from mlx_ft import logprobs

        monkeypatch.setattr(logprobs, "_STREAMS", [mx.default_stream(mx.cpu),
                                                   mx.new_stream(mx.cpu)])
    fast = _loss_grads_logps(backend_name, cfg, model, tiny_tokenizer, batch)
    for key, value in LEVERS_OFF[backend_name].items():
        monkeypatch.setenv(key, value)
    if backend_name == "torch":  # the checkpointed chunks instead of the fused head
        from cuda_ft import logprobs

        monkeypatch.setattr(logprobs, "linear_head_weight", lambda head: None)
    plain = _loss_grads_logps(backend_name, cfg, model, tiny_tokenizer, batch)
    assert fast[0] == pytest.approx(plain[0], abs=1e-6)
    assert fast[1].keys() == plain[1].keys()
    for name in plain[1]:
        scale = np.abs(plain[1][name]).max() + 1e-12
        np.testing.assert_allclose(fast[1][name] / scale, plain[1][name] / scale, atol=2e-5,
                                   err_msg=name)
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(fast[2][real], plain[2][real], atol=1e-5)
