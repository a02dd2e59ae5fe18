"""Config: flags from the dataclass, YAML, precedence, and errors that name the nearest option."""

from __future__ import annotations

import pytest

from algorithms.config import ConfigError, build_config
from algorithms.sft import SFTConfig


def test_defaults_and_flags():
    cfg = build_config(SFTConfig, ["--data", "d.jsonl", "--lora-rank", "4", "--packing",
                                   "--target-modules", "q_proj", "v_proj"], "p")
    assert cfg.lora_rank == 4 and cfg.packing is True and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.loss_type == "nll" and cfg.learning_rate == 1e-4


def test_yaml_then_cli_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data: a.jsonl\nlora-rank: 16\nlearning_rate: 3.0e-4\nloss_type: dft\n")
    cfg = build_config(SFTConfig, ["--config", str(y), "--lora-rank", "2"], "p")
    assert (cfg.data, cfg.lora_rank, cfg.learning_rate, cfg.loss_type) == (["a.jsonl"], 2, 3e-4,
                                                                           "dft")


def test_unknown_yaml_key_names_nearest(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data: a.jsonl\nlearning_rat: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*'learning_rate'"):
        build_config(SFTConfig, ["--config", str(y)], "p")


def test_unknown_flag_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown flag --lora-rnk.*--lora-rank"):
        build_config(SFTConfig, ["--data", "x", "--lora-rnk", "4"], "p")


@pytest.mark.parametrize("argv, message", [
    (["--data", "x", "--lora-rank", "0"], r"--lora-rank=0: must be > 0"),
    (["--data", "x", "--lora-rank", "two"], r"--lora-rank expects int, got 'two'"),
    (["--data", "x", "--lora-dropout", "1.5"], r"--lora-dropout=1.5: must be in \[0, 1\)"),
    ([], r"--data=''.*required"),
])
def test_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        build_config(SFTConfig, argv, "p")


def test_bad_choice_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_config(SFTConfig, ["--data", "x", "--loss-type", "mse"], "p")
    assert "invalid choice: 'mse'" in capsys.readouterr().err


def test_bad_choice_in_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data: a\nlr_schedule: step\n")
    with pytest.raises(ConfigError, match=r"--lr-schedule='step': must be one of constant, linear"):
        build_config(SFTConfig, ["--config", str(y)], "p")
