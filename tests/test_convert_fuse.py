"""`fuse`: LoRA/DoRA adapters (mlx-lm or PEFT) merged into HF and MLX model dirs, shard by shard.

The fused model, loaded by transformers or mlx_lm.load, gives the logits of base + adapter
(fp32, 1e-4). For a quantised MLX base the adapted layers are re-quantised, so the reference is
the dequantised base + adapter, within the error that quantising the base itself caused (each
re-quantised weight moves by at most half a quantisation step, as every weight did when the base
was quantised, and only the adapted layers move); and mlx-lm's own fuse, to 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_convert_adapters import (
    IDS,
    make_mlx_adapter,
    make_peft_adapter,
    mlx_logits,
    peft_logits,
)
from tiny import make_tiny_model

from converters.__main__ import main
from converters.fuse import fuse

ATOL = 1e-4


def hf_logits(model_dir: Path) -> np.ndarray:
    return peft_logits(model_dir)


@pytest.fixture(scope="module")
def mlx_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """The tiny Llama as mlx-lm writes it: float32, and 8-bit quantised (group size 64)."""
    from mlx_lm.convert import convert

    root = tmp_path_factory.mktemp("mlx_models")
    convert(str(tiny_llama_dir), str(root / "fp32"))
    convert(str(tiny_llama_dir), str(root / "q8"), quantize=True, q_bits=8, q_group_size=64)
    return {"fp32": root / "fp32", "q8": root / "q8"}


def _sharded_copy(src: Path, dst: Path, second=lambda key: "layers.1." in key) -> Path:
    """``src`` with its weights split into two shards and an index, as large models are."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = {"model-00001-of-00002.safetensors": [k for k in weights if not second(k)],
             "model-00002-of-00002.safetensors": [k for k in weights if second(k)]}
    for shard, keys in names.items():
        save_file({k: weights[k] for k in keys}, str(dst / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: shard for shard, keys in names.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_hf_base_with_peft_dora(tmp_path, tiny_llama_dir):
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "peft", dora=True, targets="all-linear")
    fuse(tiny_llama_dir, adapter, tmp_path / "fused", fmt="hf")
    reference = peft_logits(tiny_llama_dir, adapter)
    np.testing.assert_allclose(hf_logits(tmp_path / "fused"), reference, atol=ATOL, rtol=0)
    assert (tmp_path / "fused/tokenizer.json").is_file()


def test_sharded_hf_base_with_mlx_lora(tmp_path, tiny_qwen2_dir):
    base = _sharded_copy(tiny_qwen2_dir, tmp_path / "sharded")
    adapter = make_mlx_adapter(tiny_qwen2_dir, tmp_path / "mlx", dora=False,
                               keys=["self_attn.q_proj", "mlp.down_proj"], num_layers=2)
    assert main(["fuse", str(base), str(adapter), str(tmp_path / "fused"), "--format", "hf"]) == 0
    out = tmp_path / "fused"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in out.glob("model-*.safetensors"))
    assert index["weight_map"] == json.loads(
        (base / "model.safetensors.index.json").read_text())["weight_map"]
    np.testing.assert_allclose(hf_logits(out), mlx_logits(tiny_qwen2_dir, adapter),
                               atol=ATOL, rtol=0)


def test_mlx_base_with_mlx_dora(tmp_path, mlx_dirs):
    adapter = make_mlx_adapter(mlx_dirs["fp32"], tmp_path / "mlx", dora=True, keys=None,
                               num_layers=1)
    fuse(mlx_dirs["fp32"], adapter, tmp_path / "fused", fmt="mlx")
    np.testing.assert_allclose(mlx_logits(tmp_path / "fused"),
                               mlx_logits(mlx_dirs["fp32"], adapter), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_quantised_mlx_base_is_requantised(tmp_path, mlx_dirs, tiny_llama_dir, dora):
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_unflatten

    q8 = mlx_dirs["q8"]
    adapter = make_mlx_adapter(mlx_dirs["fp32"], tmp_path / "mlx", dora=dora,
                               keys=["self_attn.o_proj", "mlp.up_proj"], num_layers=2)
    fuse(q8, adapter, tmp_path / "fused", fmt="mlx")
    config = json.loads((tmp_path / "fused/config.json").read_text())
    assert config["quantization"] == json.loads((q8 / "config.json").read_text())["quantization"]
    fused = mlx_logits(tmp_path / "fused")
    # mlx-lm's own fuse of the same adapter (dequantise, merge, re-quantise): same numbers
    model, _ = mlx_lm.load(str(q8), adapter_path=str(adapter))
    dequantised_plus_adapter = np.array(model(mx.array(IDS)))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules()
                                         if hasattr(m, "fuse")]))
    np.testing.assert_allclose(fused, np.array(model(mx.array(IDS))), atol=ATOL, rtol=0)
    quantisation_error = np.abs(mlx_logits(q8) - mlx_logits(tiny_llama_dir)).max()
    assert np.abs(fused - dequantised_plus_adapter).max() <= quantisation_error

    # a module whose scales and biases sit in another shard than its weight fuses the same
    split = _sharded_copy(q8, tmp_path / "split", lambda k: k.endswith((".scales", ".biases")))
    fuse(split, adapter, tmp_path / "fused_split", fmt="mlx")
    np.testing.assert_array_equal(mlx_logits(tmp_path / "fused_split"), fused)
    assert not (tmp_path / "fused_split/model-00002-of-00002.safetensors").exists()

    fuse(q8, adapter, tmp_path / "dequantised", fmt="mlx", dequantize_all=True)
    assert "quantization" not in json.loads((tmp_path / "dequantised/config.json").read_text())
    np.testing.assert_allclose(mlx_logits(tmp_path / "dequantised"), dequantised_plus_adapter,
                               atol=ATOL, rtol=0)


def test_quantize_bits_on_unquantised_base(tmp_path, mlx_dirs):
    import mlx.core as mx
    import mlx_lm
    from mlx import nn

    adapter = make_peft_adapter(mlx_dirs["fp32"], tmp_path / "peft", dora=False,
                                targets=["gate_proj"])
    fuse(mlx_dirs["fp32"], adapter, tmp_path / "plain", fmt="mlx")
    fuse(mlx_dirs["fp32"], adapter, tmp_path / "q4", fmt="mlx", quantize_bits=4, group_size=32)
    config = json.loads((tmp_path / "q4/config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    # the reference: the unquantised fused model quantised by mlx itself
    model, _ = mlx_lm.load(str(tmp_path / "plain"))
    nn.quantize(model, group_size=32, bits=4)
    np.testing.assert_allclose(mlx_logits(tmp_path / "q4"), np.array(model(mx.array(IDS))),
                               atol=ATOL, rtol=0)


# --- bad input: nothing written ---------------------------------------------------------------
def _fails(tmp_path, match, *args, error=ValueError, **kwargs):
    with pytest.raises(error, match=match):
        fuse(*args, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_adapter_for_another_base(tmp_path, tiny_llama_dir):
    other = make_tiny_model(tmp_path / "narrow", hidden_size=32, heads=4, kv_heads=2)
    adapter = make_peft_adapter(other, tmp_path / "peft", dora=False, targets=["q_proj"])
    _fails(tmp_path, r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has "
           r"shape \(4, 32\) but the base's model\.layers\.0\.self_attn\.q_proj\.weight in "
           r".*model\.safetensors has shape \(64, 64\)", tiny_llama_dir, adapter, fmt="hf")


def test_bad_options_and_inputs(tmp_path, tiny_llama_dir, mlx_dirs):
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "peft", dora=False, targets=["q_proj"])
    _fails(tmp_path, "apply to MLX model dirs", tiny_llama_dir, adapter, fmt="hf",
           quantize_bits=4)
    _fails(tmp_path, "bits must be one of", mlx_dirs["fp32"], adapter, fmt="mlx",
           quantize_bits=7)
    _fails(tmp_path, "a quantised model", mlx_dirs["q8"], adapter, fmt="hf")
    _fails(tmp_path, "expected exactly one of", tiny_llama_dir, tmp_path, fmt="hf",
           error=FileNotFoundError)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        fuse(tiny_llama_dir, adapter, tmp_path / "out", fmt="hf")
    assert not any((tmp_path / "out").iterdir())
    fuse(tiny_llama_dir, adapter, tmp_path / "out", fmt="hf", force=True)
    assert (tmp_path / "out/model.safetensors").is_file()


@pytest.mark.parametrize("prog, spec", [("mlx_ft", "mlx_ft.backend:MLXBackend"),
                                        ("cuda_ft", "cuda_ft.backend:TorchBackend")])
def test_fuse_refuses_an_adapter_trained_on_another_base(tmp_path, tiny_llama_dir, prog, spec,
                                                         capsys):
    """Regression: fuse merged an adapter into any base of the right shapes."""
    from algorithms.cli import run_cli

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "say hi", "completion": " hi hi"}) + "\n")
    run = tmp_path / "run"
    assert run_cli(prog, spec, ["sft", "--model", str(tiny_llama_dir), "--data", str(data),
                                "--run-dir", str(run), "--steps", "1", "--batch-size", "1",
                                "--max-length", "32", "--no-progress"]) == 0
    adapter = run / "adapters"
    record = json.loads((adapter / "posttrain_base.json").read_text())
    assert record["architecture"]["model_type"] == "llama" and record["base_fingerprint"]
    same_shapes = make_tiny_model(tmp_path / "retrained", seed=7)
    other_arch = make_tiny_model(tmp_path / "qwen", family="qwen2")
    argv = ["fuse", "--format", "hf"]
    assert main([*argv, str(same_shapes), str(adapter), str(tmp_path / "a")]) == 2
    assert "whose weights differ from" in capsys.readouterr().err
    assert main([*argv, str(other_arch), str(adapter), str(tmp_path / "b"),
                 "--ignore-base-fingerprint"]) == 2
    assert "trained on another architecture" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main([*argv, str(same_shapes), str(adapter), str(tmp_path / "c"),
                 "--ignore-base-fingerprint"]) == 0
    assert main([*argv, str(tiny_llama_dir), str(adapter), str(tmp_path / "d")]) == 0
