"""hf-to-mlx / mlx-to-hf on tiny models of every supported family, built in code.

Cross-library checks: the MLX output loads in mlx_lm.load with transformers' fp32 logits (1e-4)
and the same greedy tokens; hf -> mlx -> hf is bit-identical and loads in transformers;
quantised outputs dequantise to exactly mx.dequantize of what was stored.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_tiny_model
from transformers import AutoModelForCausalLM

from converters import keymaps
from converters.__main__ import main
from converters.hf_mlx import hf_to_mlx, mlx_to_hf
from converters.shards import read_layout

FAMILIES = sorted(keymaps.FAMILIES)
TOKENS = [[5, 17, 33, 100, 200, 7, 9, 250]]


def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager")


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def hf_greedy(model, n: int) -> list[int]:
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(TOKENS[0]):].tolist()


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def mlx_greedy(model, n: int) -> list[int]:
    steps = generate_step(mx.array(TOKENS[0]), model, max_tokens=n)
    return [int(token) for token, _ in steps]


def tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted({info.file for info in read_layout(model_dir).values()}):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return out


def assert_bit_identical(a_dir, b_dir) -> None:
    a, b = tensors(a_dir), tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_both_ways(family, tmp_path):
    src = make_tiny_model(tmp_path / "hf", family)
    reference = hf_model(src)
    mlx_dir = hf_to_mlx(src, tmp_path / "mlx")
    model, _ = mlx_load(str(mlx_dir))
    np.testing.assert_allclose(mlx_logits(model), hf_logits(reference), atol=1e-4, rtol=0)
    assert mlx_greedy(model, 4) == hf_greedy(reference, 4)

    back = mlx_to_hf(mlx_dir, tmp_path / "back")
    assert_bit_identical(src, back)
    tied = family.startswith("gemma")
    assert config(back) == {**config(src), "tie_word_embeddings": tied}
    np.testing.assert_array_equal(hf_logits(hf_model(back)), hf_logits(reference))


@pytest.mark.parametrize("family", ["qwen3", "gemma"])
def test_derived_tensors_are_dropped(family, tmp_path):
    """Regression: mlx-lm's qwen3 / gemma keep a stored inv_freq (gemma a tied lm_head too), so
    mlx_lm.load's strict weight check failed on checkpoints that carry them."""
    src = make_tiny_model(tmp_path / "hf", family, tie_word_embeddings=True)
    weights = tensors(src)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, _ = mlx_load(str(hf_to_mlx(src, tmp_path / "mlx")))
    assert "lm_head.weight" not in tensors(tmp_path / "mlx")
    np.testing.assert_allclose(mlx_logits(model), hf_logits(hf_model(src)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, nested", [
    ("llama", {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ("phi3", {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
])
def test_nested_rope_parameters(family, nested, tmp_path):
    """Regression: transformers 5 saves only rope_parameters, which mlx-lm's llama and phi3
    ignore, so they silently used rope_theta 10000, no scaling and full rotary."""
    src = make_tiny_model(tmp_path / "hf", family)
    hf_config = config(src)
    for key in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        hf_config.pop(key, None)
    hf_config["rope_parameters"] = nested
    (src / "config.json").write_text(json.dumps(hf_config))
    model, _ = mlx_load(str(hf_to_mlx(src, tmp_path / "mlx")))
    np.testing.assert_allclose(mlx_logits(model), hf_logits(hf_model(src)), atol=1e-4, rtol=0)
    assert config(mlx_to_hf(tmp_path / "mlx", tmp_path / "back")) == {
        **hf_config, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Every input size a multiple of 128, so every group size quantises every layer."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), "llama", hidden_size=128,
                           intermediate=256)


def check_dequantised(mlx_dir, hf_dir, src, bits_of) -> None:
    """Quantised layers come back as exactly mx.dequantize of what was stored; the rest as is."""
    stored, back, original = tensors(mlx_dir), tensors(hf_dir), tensors(src)
    assert sorted(back) == sorted(original)
    entry = config(mlx_dir)["quantization"]
    for name, value in back.items():
        module = name.removesuffix(".weight")
        if f"{module}.scales" not in stored:
            assert torch.equal(value, original[name]), name
            continue
        bits = bits_of(module)
        packed = stored[f"{module}.weight"]
        assert packed.dtype == torch.uint32 and packed.shape[-1] * 32 // bits == value.shape[-1]
        parts = [mx.array(stored[f"{module}.{p}"].numpy()) for p in ("weight", "scales", "biases")]
        want = mx.dequantize(*parts, group_size=entry["group_size"], bits=bits)
        np.testing.assert_array_equal(value.numpy(), np.array(want), err_msg=name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantised_loads_and_dequantises(bits, group_size, wide_llama, tmp_path):
    out = hf_to_mlx(wide_llama, tmp_path / "q", bits=bits, group_size=group_size)
    assert config(out)["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    quantised = {n.removesuffix(".scales") for n in tensors(out) if n.endswith(".scales")}
    assert len(quantised) == 2 * 7 + 2  # every Linear of 2 layers, embed_tokens, lm_head
    model, _ = mlx_load(str(out))
    logits = mlx_logits(model)
    error = np.abs(logits - hf_logits(hf_model(wide_llama))).max()
    assert error < (0.05 if bits == 8 else 0.5)  # measured: 8 bit ~0.01, 4 bit ~0.17
    assert len(mlx_greedy(model, 3)) == 3

    back = mlx_to_hf(out, tmp_path / "hf")
    check_dequantised(out, back, wide_llama, lambda module: bits)
    assert "quantization" not in config(back) and "quantization_config" not in config(back)
    np.testing.assert_allclose(hf_logits(hf_model(back)), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_mixed_recipe_keeps_embeddings_and_head_at_8_bits(family, tmp_path):
    src = make_tiny_model(tmp_path / "hf", family, hidden_size=128, intermediate=256)
    out = hf_to_mlx(src, tmp_path / "q", bits=4, group_size=64, mixed=True)
    high = {"model.embed_tokens", "lm_head"} if family == "llama" else {"model.embed_tokens"}
    entry = config(out)["quantization"]
    assert {k for k, v in entry.items() if isinstance(v, dict)} == high
    assert all(entry[k] == {"group_size": 64, "bits": 8, "mode": "affine"} for k in high)
    model, _ = mlx_load(str(out))
    assert np.abs(mlx_logits(model) - hf_logits(hf_model(src))).max() < 0.5
    back = mlx_to_hf(out, tmp_path / "back")
    check_dequantised(out, back, src, lambda module: 8 if module in high else 4)


def test_layers_not_divisible_by_group_size_stay_unquantised(tiny_llama_dir, tmp_path):
    out = hf_to_mlx(tiny_llama_dir, tmp_path / "q", bits=4, group_size=128)  # hidden 64
    assert sorted(n for n in tensors(out) if n.endswith(".scales")) == [
        f"model.layers.{i}.mlp.down_proj.scales" for i in range(2)]  # input 128
    mlx_load(str(out))
    check_dequantised(out, mlx_to_hf(out, tmp_path / "hf"), tiny_llama_dir, lambda module: 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast(dtype, tiny_qwen2_dir, tmp_path):
    out = hf_to_mlx(tiny_qwen2_dir, tmp_path / "mlx", dtype=dtype)
    cast = getattr(torch, dtype)
    source = tensors(tiny_qwen2_dir)
    for name, value in tensors(out).items():
        assert value.dtype == cast and torch.equal(value, source[name].to(cast)), name
    assert config(out)["torch_dtype"] == dtype
    mlx_load(str(out))
    back = mlx_to_hf(out, tmp_path / "hf")
    assert_bit_identical(out, back)
    assert_bit_identical(back, mlx_to_hf(hf_to_mlx(back, tmp_path / "m2"), tmp_path / "h2"))
    assert AutoModelForCausalLM.from_pretrained(str(back)).dtype == cast
    quantised = hf_to_mlx(tiny_qwen2_dir, tmp_path / "q", dtype=dtype, bits=8, group_size=32)
    assert tensors(quantised)["lm_head.scales"].dtype == cast
    assert tensors(mlx_to_hf(quantised, tmp_path / "qhf"))["lm_head.weight"].dtype == cast


def test_small_shards_round_trip(tiny_llama_dir, tmp_path):
    mlx_dir = hf_to_mlx(tiny_llama_dir, tmp_path / "mlx", max_shard_bytes=100_000)
    index = json.loads((mlx_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    model, _ = mlx_load(str(mlx_dir))
    np.testing.assert_allclose(mlx_logits(model), hf_logits(hf_model(tiny_llama_dir)), atol=1e-4)
    back = mlx_to_hf(mlx_dir, tmp_path / "hf", max_shard_bytes=150_000)
    assert_bit_identical(tiny_llama_dir, back)
    # a quantised layer's weight, scales and biases split across shards still dequantise
    quantised = hf_to_mlx(back, tmp_path / "q", bits=8, group_size=32, max_shard_bytes=5_000)
    assert len({info.file for info in read_layout(quantised).values()}) > 10
    check_dequantised(quantised, mlx_to_hf(quantised, tmp_path / "qhf"), tiny_llama_dir,
                      lambda module: 8)


def assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_config(model_dir, **changes) -> None:
    (model_dir / "config.json").write_text(json.dumps({**config(model_dir), **changes}))


def test_bad_input_fails_before_writing(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    bad = copy_model(tiny_llama_dir, tmp_path / "no_config")
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no_config/config.json"):
        hf_to_mlx(bad, out)
    bad = copy_model(tiny_llama_dir, tmp_path / "unknown")
    rewrite_config(bad, model_type="falcon")
    with pytest.raises(ValueError, match="'falcon'.*gemma, gemma2, llama, mistral, phi3, qwen2"):
        hf_to_mlx(bad, out)
    bad = copy_model(tiny_llama_dir, tmp_path / "no_weights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_weights: no model.*safetensors"):
        hf_to_mlx(bad, out)
    assert_nothing_written(out)


@pytest.mark.parametrize("change, message", [
    ("shape", "model.safetensors: tensor model.layers.1.mlp.up_proj.weight has shape"),
    ("extra", "model.safetensors: tensor model.layers.1.mlp.extra.weight is not a parameter"),
    ("missing", "tensor model.layers.1.mlp.up_proj.weight is missing"),
])
def test_tensor_mismatch_names_file_and_key(change, message, tiny_llama_dir, tmp_path):
    bad = copy_model(tiny_llama_dir, tmp_path / "bad")
    weights = tensors(bad)
    key = "model.layers.1.mlp.up_proj.weight"
    if change == "shape":
        weights[key] = weights[key][:-1].clone()
    elif change == "extra":
        weights["model.layers.1.mlp.extra.weight"] = weights[key].clone()
    else:
        del weights[key]
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for convert in (hf_to_mlx, mlx_to_hf):
        with pytest.raises(ValueError, match=message):
            convert(bad, tmp_path / "out")
        assert_nothing_written(tmp_path / "out")


def test_bad_settings_are_refused(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    for kwargs, message in [({"bits": 7}, "bits = 7 is not supported .*2, 3, 4, 5, 6, 8"),
                            ({"bits": 4, "group_size": 48}, "group_size = 48 .*32, 64, 128"),
                            ({"mixed": True}, "need bits"), ({"group_size": 32}, "need bits"),
                            ({"dtype": "int8"}, "dtype = 'int8'")]:
        with pytest.raises(ValueError, match=message):
            hf_to_mlx(tiny_llama_dir, out, **kwargs)
    assert_nothing_written(out)


def test_unsupported_quantisation_is_refused(tiny_llama_dir, tmp_path):
    quantised = hf_to_mlx(tiny_llama_dir, tmp_path / "q", bits=4, group_size=32)
    with pytest.raises(ValueError, match="already quantised"):
        hf_to_mlx(quantised, tmp_path / "out")
    mode = copy_model(quantised, tmp_path / "mxfp4")
    rewrite_config(mode, quantization={"group_size": 32, "bits": 4, "mode": "mxfp4"})
    with pytest.raises(ValueError, match="mxfp4/config.json: .*mode 'mxfp4'"):
        mlx_to_hf(mode, tmp_path / "out")
    gptq = copy_model(tiny_llama_dir, tmp_path / "gptq")
    rewrite_config(gptq, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="gptq/config.json: quantization_config.quant_method"):
        mlx_to_hf(gptq, tmp_path / "out")
    no_biases = copy_model(quantised, tmp_path / "no_biases")
    weights = {k: v for k, v in tensors(no_biases).items() if k != "lm_head.biases"}
    save_file(weights, str(no_biases / "model.safetensors"), metadata={"format": "mlx"})
    (no_biases / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="lm_head.scales has no lm_head.biases"):
        mlx_to_hf(no_biases, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_mlx(tiny_llama_dir, out)
    # --force never deletes a dir it did not write (the bug: it replaced any dir, or a file)
    with pytest.raises(FileExistsError, match="not an output of hf-to-mlx"):
        hf_to_mlx(tiny_llama_dir, out, force=True)
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    hf_to_mlx(tiny_llama_dir, out, force=True)
    hf_to_mlx(tiny_llama_dir, out, force=True, dtype="float16")  # its own previous output
    assert (out / "model.safetensors").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    with pytest.raises(FileExistsError, match="is a file"):
        hf_to_mlx(tiny_llama_dir, a_file, force=True)
    assert a_file.read_text() == "precious"


def test_interrupted_conversion_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    from converters import shards

    def interrupt(self, name, array):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.ShardWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mlx(tiny_llama_dir, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_cli(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["hf-to-mlx", str(tiny_llama_dir), str(out), "--bits", "8",
                 "--group-size", "32", "--mixed", "--max-shard-size", "50KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert main(["hf-to-mlx", str(tiny_llama_dir), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["hf-to-mlx", str(tiny_llama_dir), str(tmp_path / "x"), "--bits", "7"]) == 2
    assert "bits = 7 is not supported" in capsys.readouterr().err
    assert main(["mlx-to-hf", str(out), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert str(tmp_path / "hf") in capsys.readouterr().out
    assert {v.dtype for v in tensors(tmp_path / "hf").values()} == {torch.bfloat16}


def test_key_maps_invert():
    family = keymaps.Family("toy", "ToyForCausalLM", "llama", False,
                            renames=(("mlp.gate_proj", "mlp.w1"), ("self_attn", "attention")))
    keys = ["model.layers.0.mlp.gate_proj.weight", "model.layers.3.self_attn.q_proj.bias",
            "model.norm.weight", "lm_head.weight", "model.layers.1.mlp.gate_proj_x.weight"]
    mlx_keys = [keymaps.hf_to_mlx_key(family, k, tied=False) for k in keys]
    assert mlx_keys[:2] == ["model.layers.0.mlp.w1.weight", "model.layers.3.attention.q_proj.bias"]
    assert mlx_keys[2:] == keys[2:]  # whole dotted components only
    assert [keymaps.mlx_to_hf_key(family, k) for k in mlx_keys] == keys
    assert keymaps.hf_to_mlx_key(family, "lm_head.weight", tied=True) is None
    assert keymaps.hf_to_mlx_key(family, "model.layers.0.self_attn.rotary_emb.inv_freq",
                                 tied=False) is None
    with pytest.raises(ValueError, match="not unique"):
        keymaps.Family("bad", "Bad", "llama", False, renames=(("a", "x"), ("b", "x")))
    with pytest.raises(ValueError, match="c.json: .*always ties"):
        keymaps.is_tied(keymaps.FAMILIES["gemma"], {"tie_word_embeddings": False}, "c.json")


def test_shard_helpers(tmp_path):
    from converters.shards import ShardWriter, parse_size, read_header

    assert [parse_size(s) for s in ("5GB", "2GiB", "100mb", "1024")] == [
        5 * 10**9, 2 * 2**30, 10**8, 1024]
    for bad in ("five", "0", "5GX"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    for name, n in [("a", 100), ("b", 100), ("c", 50), ("big", 400), ("d", 10)]:
        writer.add(name, mx.zeros((n,)))  # float32: 4 bytes each
    index = writer.close()  # a shard may reach the limit exactly; a bigger tensor goes alone
    shard = "model-{:05d}-of-00003.safetensors".format
    assert index["weight_map"] == {"a": shard(1), "b": shard(1), "c": shard(1), "big": shard(2),
                                   "d": shard(3)}
    assert writer.shard_sizes == [1000, 1600, 40] and index["metadata"]["total_size"] == 2640
    assert read_header(tmp_path / shard(2))[1]["big"].shape == (400,)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")


def test_disk_full_leaves_nothing_and_says_so(tiny_llama_dir, tiny_tmpfs, capsys):
    """A 64 KiB disk cannot hold the 0.5 MB model: one line naming the output, nothing left."""
    out = tiny_tmpfs / "out"
    assert main(["hf-to-mlx", str(tiny_llama_dir), str(out)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: disk full")
    assert list(tiny_tmpfs.iterdir()) == []


def test_disk_full_injected(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("converters.atomic._normalise_permissions", no_space)
    out = tmp_path / "out"
    assert main(["mlx-to-hf", str(tiny_llama_dir), str(out)]) == 2
    assert f"error: {out}: disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
