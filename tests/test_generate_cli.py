"""``generate`` and ``chat`` on both backends: greedy equals mlx-lm's / transformers' own
greedy decoding, a seed reproduces a sample, JSONL in and out, adapters of either format."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from algorithms.cli import run_cli

pytest.importorskip("mlx")
pytest.importorskip("torch")

BACKENDS = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
            "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}
PROMPTS = ["What is two plus two?", "Hello! How are you today?", "Write a poem"]


def _generate(backend, capsys, *argv):
    capsys.readouterr()
    assert run_cli(*BACKENDS[backend], ["generate", *argv]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def _chat_ids(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference_greedy(backend, model_dir, tokenizer, ids, n):
    """The library's own greedy continuation (token ids) of one prompt."""
    if backend == "mlx":
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load

        model, _ = load(str(model_dir))
        out = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=n):
            out.append(int(token))
        return out
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                         dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_greedy_equals_the_library_and_batches_agree(backend, tiny_llama_dir, tiny_tokenizer,
                                                     tmp_path, capsys):
    """--temperature 0 decodes the tokens mlx-lm's generate_step / transformers' generate
    (do_sample=False) pick, for every prompt of a batched JSONL."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    rows = _generate(backend, capsys, "--model", str(tiny_llama_dir), "--prompts", str(prompts),
                     "--max-tokens", "6", "--dtype", "float32", "--batch-size", "2")
    assert [r["id"] for r in rows] == [0, 1, 2]
    for row, prompt in zip(rows, PROMPTS):
        ids = _chat_ids(tiny_tokenizer, prompt)
        want = _reference_greedy(backend, tiny_llama_dir, tiny_tokenizer, ids, 6)
        n = row["completion_tokens"]
        assert n == 6 or row["finish_reason"] == "eos"
        assert tiny_tokenizer.decode(want[:n], skip_special_tokens=True) == row["completion"]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_seed_reproduces_a_sample(backend, tiny_llama_dir, capsys):
    argv = ["--model", str(tiny_llama_dir), "--prompt", "Hello", "--max-tokens", "8",
            "--temperature", "1.0", "--top-k", "50", "--dtype", "float32", "--system", "Be kind."]
    a = _generate(backend, capsys, *argv, "--seed", "7")
    b = _generate(backend, capsys, *argv, "--seed", "7")
    c = _generate(backend, capsys, *argv, "--seed", "8")
    assert a == b and a[0]["prompt"] == "Hello"
    assert a != c or len(a[0]["completion"]) == 0


def test_adapter_of_either_format_and_chat_history(tiny_llama_dir, tmp_path, capsys,
                                                   monkeypatch):
    """An adapter trained by mlx_ft generates the same greedy text on cuda_ft (converted on the
    fly); chat keeps the history (the second turn's prompt holds the first exchange)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "say red", "completion": " red red red"})
                            + "\n" for _ in range(8)))
    run = tmp_path / "run"
    assert run_cli(*BACKENDS["mlx"], ["sft", "--model", str(tiny_llama_dir), "--data", str(data),
                                      "--run-dir", str(run), "--steps", "8", "--learning-rate",
                                      "3e-2", "--no-progress", "--no-plots",
                                      "--dtype", "float32"]) == 0
    argv = ["--model", str(tiny_llama_dir), "--adapter", str(run / "adapters"), "--prompt",
            "say red", "--max-tokens", "5", "--dtype", "float32"]
    mlx_rows, torch_rows = (_generate(b, capsys, *argv) for b in ("mlx", "torch"))
    assert mlx_rows[0]["completion"] == torch_rows[0]["completion"]
    base = _generate("mlx", capsys, *argv[:2], *argv[4:])
    assert base[0]["completion"] != mlx_rows[0]["completion"]
    seen = []
    from mlx_ft.backend import MLXBackend

    original = MLXBackend.sample

    def spy(self, prompts, params, seed):
        seen.append(self.tokenizer.decode(prompts[0]))
        return original(self, prompts, params, seed)

    monkeypatch.setattr(MLXBackend, "sample", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("say red\nsay blue\n/reset\nsay cat\n"))
    capsys.readouterr()
    assert run_cli(*BACKENDS["mlx"], ["chat", *argv[:4], "--max-tokens", "3",
                                      "--dtype", "float32"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert "say red" in seen[1] and "say blue" in seen[1]
    assert "say red" not in seen[2] and "say cat" in seen[2]
    np.testing.assert_equal(len(seen), 3)
