"""The DPO / GRPO side of scripts/bench.py: recipes, matched settings against TRL's trainers,
the per-phase time split, and (slow) TRL's DPOTrainer / GRPOTrainer run side by side."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from scripts.benchkit import measure, report, settings, synthetic, trl_trainers
from scripts.benchkit.recipe import Recipe, matched_keys, our_flags

GRPO = {"model": "/m", "data": "abc", "fine_tune_type": "lora", "lora_rank": 8,
        "lora_alpha": 16.0, "target_modules": ["mlp.up_proj"], "batch_size": 8,
        "steps": 3, "learning_rate": 1e-4, "dtype": "float32", "algorithm": "grpo",
        "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 64,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": 0.04, "loss_type": "grpo",
        "epsilon": 0.2, "scale_rewards": "group", "use_bias_correction_kl": False,
        "num_iterations": 1, "reward": "math_answer"}


def test_recipe_defaults_follow_the_algorithm():
    assert Recipe().data == "synthetic:chat" and Recipe().beta is None
    assert (Recipe(algorithm="dpo").data, Recipe(algorithm="dpo").beta) == \
        ("synthetic:preference", 0.1)
    grpo = Recipe(algorithm="grpo", batch_size=8)
    assert (grpo.data, grpo.beta) == ("synthetic:arith", 0.04)
    grpo.validate()
    assert "max_length" not in matched_keys("grpo")
    assert {"num_generations", "max_completion_length", "beta", "reward"} <= \
        set(matched_keys("grpo"))
    assert {"beta", "loss_type", "max_length"} <= set(matched_keys("dpo"))
    with pytest.raises(ValueError, match="--batch-size=5: must divide"):
        Recipe(algorithm="grpo", batch_size=5).validate()
    with pytest.raises(ValueError, match="--num-generations=1"):
        Recipe(algorithm="grpo", num_generations=1).validate()


def test_our_flags_carry_the_online_and_preference_settings(tmp_path):
    flags = our_flags(Recipe(algorithm="grpo", batch_size=8, num_generations=6, temperature=0.7),
                      tmp_path, tmp_path, tmp_path / "run", "float32")
    pairs = dict(itertools.pairwise(flags))
    assert pairs["--num-generations"] == "6" and pairs["--prompts-per-step"] == "8"
    assert pairs["--max-completion-length"] == "64" and pairs["--beta"] == "0.04"
    assert pairs["--temperature"] == "0.7" and pairs["--reward"] == "math_answer"
    assert "--train-on" not in flags
    dpo = our_flags(Recipe(algorithm="dpo", beta=0.3), tmp_path, tmp_path, tmp_path, "float32")
    assert dict(itertools.pairwise(dpo))["--beta"] == "0.3" and "--num-generations" not in dpo


@pytest.mark.parametrize("key,value", [("num_generations", 8), ("beta", 0.0),
                                       ("max_completion_length", 128), ("loss_type", "dapo"),
                                       ("use_bias_correction_kl", True), ("temperature", 0.7),
                                       ("batch_size", 4), ("reward", "format_regex")])
def test_online_comparison_is_refused_on_any_generation_or_loss_difference(key, value):
    ours = measure.Run("torch-cpu", "ours", "torch", "cpu", settings=GRPO,
                       summary={"tokens_per_s": 2.0})
    theirs = measure.Run("trl-cpu", "trl", "torch", "cpu", settings={**GRPO, key: value},
                         summary={"tokens_per_s": 1.0})
    result = settings.compare(ours, theirs)
    assert result["status"] == "refused" and f"{key} (" in result["message"]
    same = settings.compare(ours, measure.Run("trl-cpu", "trl", "torch", "cpu",
                                              settings={**GRPO, "max_length": 99},
                                              summary={"tokens_per_s": 1.0}))
    assert same["status"] == "ok" and same["tokens_per_s_ratio"] == 2.0


def test_our_config_and_trl_settings_read_back_to_the_same_online_settings(tmp_path):
    from scripts.benchkit import run_ours, run_trl

    model = tmp_path / "model"
    model.mkdir()
    data = synthetic.write_synthetic(tmp_path / "data", "arith", n_train=8, n_valid=2)
    cfg = {"model_path": str(model), "data": str(data), "fine_tune_type": "lora",
           "lora_rank": 8, "lora_alpha": 16.0, "target_modules": [], "batch_size": 8,
           "max_length": 512, "steps": 3, "learning_rate": 1e-4, "algorithm": "grpo",
           "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 64,
           "temperature": 1, "top_p": 1, "top_k": 0, "beta": 0.04, "loss_type": "grpo",
           "epsilon": 0.2, "scale_rewards": "group", "use_bias_correction_kl": False,
           "num_iterations": 1, "reward": ["math_answer"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "log.txt").write_text("mlx_ft: device=cpu dtype=float32 (no MLX GPU)\n")
    ours = run_ours.read_settings(tmp_path / "config.json", tmp_path / "log.txt")
    trl = {k: v for k, v in GRPO.items() if k not in ("model", "data")}
    trl.update(model=str(model), data=str(data), target_modules=[], max_length=None,
               lora_alpha=16)
    (tmp_path / "settings.json").write_text(json.dumps(trl))
    theirs = run_trl.read_settings(tmp_path / "settings.json")
    settings.check_matched("ours", ours, "trl", theirs, matched_keys("grpo") + ("algorithm",))


def test_trl_phases_map_to_our_time_split():
    online = trl_trainers.time_split("grpo", {"generation": 5.0, "scoring": 0.5,
                                              "reference": 2.0, "prepare": 8.0,
                                              "train_step": 12.0, "forward": 1.5,
                                              "optimizer": 0.25})
    # update = the training steps without the generation batch's preparation, + the optimiser
    assert online == {"time/generation": 5.0, "time/scoring": 0.5, "time/logps": 2.0,
                      "time/update": 4.25}
    offline = trl_trainers.time_split("dpo", {"reference": 1.0, "forward": 3.0,
                                              "train_step": 7.0, "optimizer": 0.5})
    assert offline == {"time/forward": 2.0, "time/backward": 4.0, "time/optimizer": 0.5,
                       "time/reference": 1.0}
    records = [{"step": i + 1, "loss": 1.0, "step_tokens": 100, "step_time": 2.0,
                "time/generation": 1.0 + i, "time/logps": 0.5,
                "completions/mean_length": 30.0 + i} for i in range(3)]
    summary = measure.summarize(measure.steps_from_metrics(records), warmup=1)
    assert summary["time_split"] == {"time/generation": 2.5, "time/logps": 0.5}
    assert summary["completion_length"] == 31.5
    assert report.split_cell(summary["time_split"]) == "generation 2.50, logps 0.50"


def test_synthetic_preference_and_arith_sets(tmp_path):
    prefs = synthetic.write_synthetic(tmp_path / "p", "preference", n_train=200, n_valid=2)
    rows = [json.loads(line) for line in (prefs / "train.jsonl").read_text().splitlines()]
    chosen = [len(r["chosen"].split()) for r in rows]
    assert 15 <= min(chosen) and max(chosen) <= 160  # sentences may end a word or two past
    assert 40 <= statistics.median(chosen) <= 80
    assert all(r["chosen"] != r["rejected"] for r in rows)
    arith = synthetic.write_synthetic(tmp_path / "a", "arith", n_train=50, n_valid=2)
    for line in (arith / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        words = row["prompt"][0]["content"].split()
        a, op, b = int(words[2]), words[3], int(words[4].rstrip("?"))
        assert int(row["answer"]) == {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_mlx_is_compared_with_trl_when_mlx_lm_has_no_trainer():
    from scripts.bench import pair_comparisons, plan_runs
    from scripts.benchkit.backends import target

    plan = plan_runs([target("mlx-cpu")], [("", [], {})], ["trl"], trl_for_mlx=True)
    assert plan[-1] == ("trl", "cpu")
    runs = [measure.Run("mlx-cpu", "ours", "mlx", "cpu", settings=GRPO,
                        summary={"tokens_per_s": 3.0}),
            measure.Run("trl-cpu", "trl", "torch", "cpu", settings=GRPO,
                        summary={"tokens_per_s": 1.5})]
    assert pair_comparisons(runs) == []
    (pair,) = pair_comparisons(runs, trl_for_mlx=True)
    assert pair["tokens_per_s_ratio"] == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_trl_dpo_and_grpo_run_matched_with_a_time_split(tmp_path, tiny_llama_dir, algorithm):
    pytest.importorskip("trl")
    from scripts import bench

    out = tmp_path / "bench"
    bench.main(["--model", str(tiny_llama_dir), "--algorithm", algorithm, "--steps", "2",
                "--warmup", "1", "--batch-size", "4", "--max-completion-length", "8",
                "--backends", "mlx-cpu", "torch-cpu", "--compare", "trl", "--out", str(out),
                "--no-charts"])
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert all(r["status"] == "ok" for r in runs.values()), runs
    want = {"grpo": ("time/generation", "time/update"),
            "dpo": ("time/reference", "time/backward")}[algorithm]
    assert all(runs["trl-cpu"]["summary"]["time_split"][k] > 0 for k in want)
    ours = {"grpo": ("time/generation", "time/logps", "time/update"),
            "dpo": ("time/reference", "time/forward_backward", "time/optimizer")}[algorithm]
    for name in ("mlx-cpu", "torch-cpu"):
        assert all(runs[name]["summary"]["time_split"][k] > 0 for k in ours), name
    pairs = {(c["ours"], c["baseline"]): c for c in results["comparisons"]}
    assert pairs[("mlx-cpu", "trl-cpu")]["status"] == "ok"
    assert pairs[("torch-cpu", "trl-cpu")]["status"] == "ok"


def test_other_algorithms_keep_the_common_flags_only(tmp_path):
    # Regression: every non-online, non-DPO algorithm was taken for SFT and given --train-on,
    # which their CLIs refuse.
    flags = our_flags(Recipe(algorithm="kto"), tmp_path, tmp_path, tmp_path, "float32")
    assert "--train-on" not in flags and "--beta" not in flags
    assert matched_keys("kto") == matched_keys("sft")
