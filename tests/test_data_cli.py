"""End to end through the CLI: mixed sources, hold-out, chat-template override saved with the
adapters (both backends) and carried by fuse, Hub ids for model and data, --resume on changed
data."""

from __future__ import annotations

import json

import pytest
from hub_helpers import add_to_hub_cache

from algorithms.cli import run_cli
from algorithms.data.templates import BUILTIN_TEMPLATES

pytest.importorskip("mlx")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    share = [{"conversations": [{"from": "human", "value": f"say {w}"},
                                {"from": "gpt", "value": f"{w} {w}"}], "lang": "en"}
             for w in WORDS * 2]
    datasets.Dataset.from_list(share).to_parquet(str(d / "share.parquet"))
    with (d / "alpaca.jsonl").open("w") as f:
        for w in WORDS:
            f.write(json.dumps({"instruction": f"repeat {w}", "input": "",
                                "output": f"{w} {w} {w}"}) + "\n")
    return d


def train(backend, model, data, run, *extra):
    prog, spec = BACKENDS[backend]
    return run_cli(prog, spec, ["sft", "--model", str(model), "--data", *data, "--run-dir",
                                str(run), "--steps", "2", "--batch-size", "2", "--max-length",
                                "64", "--no-progress", *extra])


def test_mixed_sources_holdout_and_template_saved_and_fused(tiny_llama_dir, sources, tmp_path,
                                                            capsys):
    run = tmp_path / "run"
    data = [str(sources / "share.parquet") + ":0.7", str(sources / "alpaca.jsonl") + ":0.3"]
    assert train("mlx", tiny_llama_dir, data, run, "--valid-fraction", "0.25",
                 "--chat-template", "llama3", "--max-length", "256") == 0
    err = capsys.readouterr().err
    assert "source: " in err and "share.parquet (sharegpt -> messages): 16 rows, 16 kept" in err
    assert "columns not read: lang; 4 held out for validation; weight 0.7" in err
    assert "--chat-template llama3:" in err  # its markers are not tokens of the tiny tokenizer
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == data and config["chat_template"] == "llama3"
    fingerprints = json.loads((run / "fingerprints.json").read_text())
    assert len(fingerprints["data"]["train"]["sha256"]) == 64
    assert (run / "adapters" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["llama3"]

    from transformers import AutoTokenizer

    from converters.__main__ import main as convert

    fused = tmp_path / "fused"
    assert convert(["fuse", str(tiny_llama_dir), str(run / "adapters"), str(fused),
                    "--format", "hf"]) == 0
    assert AutoTokenizer.from_pretrained(str(fused)).chat_template == BUILTIN_TEMPLATES["llama3"]

    other = [data[0], str(sources / "alpaca.jsonl") + ":0.5"]  # another mix: other examples
    assert train("mlx", tiny_llama_dir, other, run, "--valid-fraction", "0.25",
                 "--chat-template", "llama3", "--max-length", "256", "--resume", "--steps",
                 "3") == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "data" in err


def test_torch_adapters_carry_the_template(tiny_llama_dir, sources, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    assert train("torch", tiny_llama_dir, [str(sources / "alpaca.jsonl")], run,
                 "--chat-template", "gemma", "--max-length", "256") == 0
    assert (run / "adapters" / "adapter_config.json").is_file()
    assert (run / "adapters" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["gemma"]


def test_hub_ids_for_model_and_data_offline(tiny_llama_dir, sources, tmp_path, monkeypatch,
                                            capsys):
    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_hub_cache(home, "acme/tiny-llama", tiny_llama_dir)
    add_to_hub_cache(home, "acme/share", {
        "data/train-00000-of-00001.parquet": (sources / "share.parquet").read_bytes()},
        repo_type="dataset")
    assert train("mlx", "acme/tiny-llama", ["acme/share"], tmp_path / "run") == 0
    assert "16 examples" in capsys.readouterr().err
    assert train("mlx", "acme/tiny-llama", ["acme/missing"], tmp_path / "run2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: acme/missing") and str(home / "hub") in err
    assert "Traceback" not in err
