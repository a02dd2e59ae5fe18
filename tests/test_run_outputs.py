"""What a run leaves and how it is driven: config.json reruns, trackers, plots, the run README,
log lines without a TTY, peer tools' flags, reward flags, --quantize-base, exports."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

MLX = ("mlx_ft", "mlx_ft.backend:MLXBackend")
TORCH = ("cuda_ft", "cuda_ft.backend:TorchBackend")
WORDS = ["red", "blue", "green", "cat", "dog", "sun"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    for split, words in (("train", WORDS * 2), ("valid", WORDS[:3])):
        rows = [{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in words]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _argv(model, data, run_dir, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
            "--steps", "4", "--batch-size", "2", "--max-length", "32", "--learning-rate",
            "1e-2", "--dtype", "float32", *extra]


def _losses(run_dir, split="train"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == split]


def _wandb_history(run_dir) -> dict[str, list[float]]:
    """Scalars logged to an offline W&B run, read from its .wandb file (a LevelDB-style log of
    protobuf records in 32 KiB blocks: crc32 u32, length u16, type u8, payload)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, out, data, pending = path.read_bytes(), {}, 7, b""
    while data + 7 <= len(raw):
        block_left = 32768 - data % 32768
        if block_left < 7:
            data += block_left
            continue
        _, length, kind = struct.unpack("<IHB", raw[data:data + 7])
        pending += raw[data + 7:data + 7 + length]
        data += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    out.setdefault(key, []).append(json.loads(item.value_json))
    return out


def test_config_json_reruns_the_run_with_the_same_losses(tiny_llama_dir, sft_data, tmp_path):
    """A run's config.json given to --config reproduces it (regression: it was refused with
    "unknown key 'algorithm'"), on the other backend too; another algorithm's is refused."""
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli(*MLX, _argv(tiny_llama_dir, sft_data, first, "--no-plots")) == 0
    record = str(first / "config.json")
    assert run_cli(*MLX, ["sft", "--config", record, "--run-dir", str(again)]) == 0
    assert _losses(again) == _losses(first)
    assert run_cli(*TORCH, ["sft", "--config", record, "--run-dir", str(other)]) == 0
    np.testing.assert_allclose(_losses(other), _losses(first), rtol=1e-4)
    assert run_cli(*MLX, ["dpo", "--config", record, "--run-dir", str(tmp_path / "d")]) == 2


def test_trackers_plots_readme_and_log_lines(tiny_llama_dir, sft_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert run_cli(*MLX, _argv(tiny_llama_dir, sft_data, run, "--report-to", "tensorboard",
                               "wandb", "--wandb-mode", "offline", "--log-every", "2")) == 0
    losses = _losses(run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], losses,
                               rtol=1e-6)
    assert "valid/loss" in events.Tags()["scalars"]
    history = _wandb_history(run)
    np.testing.assert_allclose(history["train/loss"], losses, rtol=1e-6)
    assert history["valid/loss"] == pytest.approx(_losses(run, "valid"))
    png = run / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    card = (run / "README.md").read_text()
    assert "sft" in card and "mlx_lm generate" in card and "PeftModel" in card
    # no TTY (pytest captures stderr): one line per --log-every steps instead of a bar
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("step ")
            and "loss" in line and "valid" not in line] == ["step 2/4", "step 4/4"]


def test_help_lists_no_progress_and_peer_flags_map_to_ours(capsys):
    with pytest.raises(SystemExit):
        run_cli(*MLX, ["sft", "--help"])
    assert "--no-progress" in capsys.readouterr().out
    for flag, ours in (("--iters", "--steps"), ("--mask-prompt", "--train-on completion"),
                       ("--num-layers", "--target-modules"), ("--bf16", "--dtype bfloat16"),
                       ("--adapter-path", "--run-dir"), ("--load-in-4bit", "--quantize-base 4"),
                       ("--per-device-train-batch-size", "--batch-size")):
        assert run_cli(*MLX, ["sft", flag, "3", "--data", "x"]) == 2
        err = capsys.readouterr().err
        assert "another tool's option; here:" in err and ours in err, flag


def test_reward_flags(tmp_path, capsys):
    """Repeated --reward accumulates (regression: the last one won); weights as 1,0.5 or
    "1 0.5"; a spec with commas stays whole; <algo> --list-rewards works."""
    from algorithms.config import build_config
    from algorithms.rl.presets import GRPOConfig

    for weights in (["1,0.5"], ["1 0.5"], ["1", "0.5"]):
        cfg = build_config(GRPOConfig, ["--data", "x", "--reward", "math_answer", "--reward",
                                        "xml_tags(think, answer)", "--reward-weights",
                                        *weights], prog="grpo")
        assert cfg.reward == ["math_answer", "xml_tags(think, answer)"]
        assert cfg.reward_weight_values() == [1.0, 0.5]
    assert run_cli(*MLX, ["grpo", "--list-rewards"]) == 0
    assert "math_answer" in capsys.readouterr().out


def test_reward_needing_a_missing_column_stops_before_the_model(tiny_llama_dir, tmp_path,
                                                                capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "question": "q"}) + "\n")
    run = tmp_path / "run"
    assert run_cli(*MLX, ["grpo", "--model", str(tiny_llama_dir), "--data", str(data),
                          "--reward", "math_answer", "--run-dir", str(run),
                          "--max-completion-length", "4"]) == 2
    err = capsys.readouterr().err
    assert "'answer'" in err and "prompt, question" in err and "device=" not in err
    assert not run.exists()


def test_quantize_base_qlora_in_one_command(tiny_llama_dir, sft_data, tmp_path, capsys):
    """--quantize-base 8 trains adapters on the quantised base (the saved adapter loads in
    mlx-lm on that base) and says the path is slow on a Linux CPU; torch refuses without CUDA."""
    run = tmp_path / "q"
    assert run_cli(*MLX, _argv(tiny_llama_dir, sft_data, run, "--quantize-base", "8",
                               "--quantize-group-size", "32", "--no-plots")) == 0
    err = capsys.readouterr().err
    assert "quantised to 8 bits" in err and "Linux CPU" in err
    assert all(np.isfinite(_losses(run))) and _losses(run)[-1] < _losses(run)[0]
    assert run_cli(*TORCH, _argv(tiny_llama_dir, sft_data, tmp_path / "t",
                                 "--quantize-base", "4")) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
