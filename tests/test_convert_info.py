"""`describe` / `python -m converters info`: every format recognised, with counts checked against
the arrays themselves (not against what describe reads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.__main__ import main
from converters.hf_mlx import hf_to_mlx
from converters.inspect import describe


def element_count(path) -> int:
    return sum(v.size for v in load_file(str(path)).values())


def test_hf_model(tiny_llama_dir):
    info = describe(tiny_llama_dir)
    assert info["format"] == "HF model" and info["architecture"] == "llama"
    assert info["dtype"] == "float32" and info["quantization"] is None
    assert info["parameters"] == element_count(tiny_llama_dir / "model.safetensors")
    assert info["parameters"] == 123_200  # 2 * 384 * 64 + 2 * (4 * 64 * 64 ... ) by hand below
    assert 2 * 384 * 64 + 64 + 2 * (2 * 64 + 64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128) == 123_200


def test_mlx_models(tiny_llama_dir, tmp_path):
    plain = describe(hf_to_mlx(tiny_llama_dir, tmp_path / "mlx", dtype="bfloat16"))
    assert plain["format"] == "MLX model" and plain["dtype"] == "bfloat16"
    assert plain["quantization"] is None and plain["parameters"] == 123_200
    mixed = describe(hf_to_mlx(tiny_llama_dir, tmp_path / "q", bits=4, group_size=32, mixed=True))
    assert mixed["format"] == "MLX model"
    assert mixed["quantization"] == {"mode": "affine", "bits": 4, "group_size": 32,
                                     "quantised_layers": 16,
                                     "per_layer": {"model.embed_tokens": 8, "lm_head": 8}}
    assert mixed["parameters"] == 123_200  # unpacked, scales and biases not counted
    assert mixed["dtypes"] == {"float32": 5 + 2 * 16, "uint32": 16}


@pytest.fixture(scope="module")
def peft_dir(tiny_llama_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(str(out))
    return out


def test_peft_adapter(peft_dir):
    info = describe(peft_dir)
    assert info["format"] == "PEFT adapter" and info["weights_file"] == "adapter_model.safetensors"
    assert info["rank"] == 4 and info["config_rank"] == 4 and info["lora_alpha"] == 8
    assert info["targets"] == ["q_proj", "v_proj"] and info["adapted_layers"] == 2
    assert info["parameters"] == element_count(peft_dir / "adapter_model.safetensors")
    assert info["parameters"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)


def test_mlx_adapter(tiny_llama_dir, tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(hf_to_mlx(tiny_llama_dir, tmp_path / "mlx")))
    model.freeze()
    lora = {"rank": 6, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "mlp.up_proj"]}
    linear_to_lora_layers(model, 1, lora)
    out = tmp_path / "adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": lora}))
    info = describe(out)
    assert info["format"] == "MLX adapter" and info["fine_tune_type"] == "lora"
    assert info["rank"] == 6 and info["targets"] == ["k_proj", "up_proj"]
    assert info["adapted_layers"] == 1 and info["num_layers"] == 1
    assert info["parameters"] == (64 * 6 + 6 * 32) + (64 * 6 + 6 * 128)


def test_gguf_file(tmp_path):
    import gguf

    path = tmp_path / "toy.gguf"
    rng = np.random.default_rng(0)
    embed = rng.normal(size=(384, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("toy")
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embed, q8_0), raw_dtype=q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = describe(path)
    assert info["format"] == "GGUF file" and info["architecture"] == "llama"
    assert info["name"] == "toy" and info["layers"] == 2 and info["context_length"] == 512
    assert info["dtype"] == "Q8_0" and info["parameters"] == 384 * 64 + 64
    assert info["quantization"] == {"file_type": "MOSTLY_Q8_0",
                                    "tensor_types": {"Q8_0": 1, "F32": 1}}


def test_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros(5, np.int64)}, str(path))
    info = describe(path)
    assert info["format"] == "safetensors file" and info["parameters"] == 17
    assert info["dtype"] == "float16" and info["dtypes"] == {"float16": 1, "int64": 1}


def test_unrecognised_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        describe(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a model dir"):
        describe(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: neither a GGUF"):
        describe(tmp_path / "notes.txt")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no adapters.safetensors"):
        describe(tmp_path)


def test_cli(tiny_llama_dir, peft_dir, capsys):
    assert main(["info", str(tiny_llama_dir)]) == 0
    text = capsys.readouterr().out
    assert "format: HF model" in text and "parameters: 123,200 (0.12M)" in text
    assert main(["info", str(peft_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] == ["q_proj", "v_proj"]
    assert main(["info", str(peft_dir / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
