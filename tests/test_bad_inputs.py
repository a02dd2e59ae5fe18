"""Bad inputs, one row each: every CLI answers with exit code 2 and ONE ``error:`` line naming
the file/line or flag and the rule, never a traceback, and leaves nothing new on disk.

Rows run in-process through each CLI's ``main(argv)``: ``python -m mlx_ft`` / ``cuda_ft``
(``run_cli``), ``python -m converters`` and ``python -m rewards``. Each row gets a fresh work
dir (its inputs are copied or written there); the dir is snapshotted (paths and bytes) before
and after, so a half-written output, a refused ``--resume`` that touched ``config.json``, or a
stray lock file fails the row. Inputs and helpers: ``bad_inputs_env.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_inputs_env import (
    GOOD_MSG,
    GOOD_SFT,
    MLX,
    SURROGATE_MSG,
    TORCH,
    Case,
    Env,
    a_dir,
    a_file,
    adapter_for_other_weights,
    bad_data,
    broken_plugin,
    corrupt_all_checkpoints,
    cut_data,
    disk_full,
    edited_config,
    edited_weights,
    garbage_weights,
    grpo,
    indexed_with_missing_shard,
    latin1,
    locked,
    make_shared,
    no_sandbox_tool,
    resume,
    score,
    sft,
    snapshot,
    truncated,
    with_valid,
    without,
    yaml_config,
)

from algorithms.cli import run_cli
from converters.__main__ import main as converters_main
from rewards.__main__ import main as rewards_main

pytest.importorskip("mlx")
pytest.importorskip("torch")


CASES = [
    # ---- config: flags and YAML ------------------------------------------------------------
    Case("lr nan", "mlx", lambda e: sft(e, "--learning-rate", "nan"),
         ("--learning-rate=nan", "finite")),
    Case("lr inf", "mlx", lambda e: sft(e, "--learning-rate", "inf"),
         ("--learning-rate=inf", "finite")),
    Case("alpha nan", "mlx", lambda e: sft(e, "--lora-alpha", "NaN"), ("--lora-alpha=nan",)),
    Case("adam epsilon nan", "mlx", lambda e: sft(e, "--adam-epsilon", "nan"),
         ("--adam-epsilon=nan", "finite")),
    Case("adam epsilon inf (torch)", "torch", lambda e: sft(e, "--adam-epsilon", "inf"),
         ("--adam-epsilon=inf", "finite")),
    Case("lora dropout 1", "mlx", lambda e: sft(e, "--lora-dropout", "1.0"),
         ("--lora-dropout=1.0", "[0, 1)")),
    Case("lora dropout 1 (torch)", "torch", lambda e: sft(e, "--lora-dropout", "1"),
         ("--lora-dropout=1.0", "[0, 1)")),
    Case("lora alpha 0", "mlx", lambda e: sft(e, "--lora-alpha", "0"),
         ("--lora-alpha=0.0", "must be > 0")),
    Case("negative seed", "mlx", lambda e: sft(e, "--seed", "-1"), ("--seed=-1", "[0, 2**32)")),
    Case("seed too large", "mlx", lambda e: sft(e, "--seed", str(2**40)), ("--seed=",)),
    Case("batch size 0", "mlx", lambda e: sft(e, "--batch-size", "0"),
         ("--batch-size=0", "must be > 0")),
    Case("negative steps", "mlx", lambda e: sft(e, "--steps", "-3"), ("--steps=-3", ">= 0")),
    Case("negative lr", "mlx", lambda e: sft(e, "--learning-rate", "-1"),
         ("--learning-rate=-1.0", ">= 0")),
    Case("rank not an int", "mlx", lambda e: sft(e, "--lora-rank", "abc"),
         ("--lora-rank expects int", "'abc'")),
    Case("steps 1.5", "mlx", lambda e: sft(e, "--steps", "1.5"), ("--steps expects int",)),
    Case("unknown flag", "mlx", lambda e: sft(e, "--learnin-rate", "1"),
         ("unknown flag --learnin-rate", "--learning-rate")),
    Case("bad choice", "mlx", lambda e: sft(e, "--fine-tune-type", "qlora"),
         ("--fine-tune-type", "invalid choice: 'qlora'")),
    Case("flag without value", "mlx", lambda e: sft(e) + ["--steps"],
         ("--steps", "expected one argument")),
    Case("no data", "mlx", lambda e: ["sft", "--model", str(e.model)],
         ("--data=''", "is required")),
    Case("steps and epochs 0", "mlx", lambda e: sft(e, "--steps", "0", "--epochs", "0"),
         ("--steps=0", "--epochs must be > 0")),
    Case("warmup negative", "mlx", lambda e: sft(e, "--warmup-steps", "-1"), ("--warmup-steps",)),
    Case("min lr ratio 2", "mlx", lambda e: sft(e, "--min-lr-ratio", "2"),
         ("--min-lr-ratio=2.0", "[0, 1]")),
    Case("beta1 = 1", "mlx", lambda e: sft(e, "--adam-beta1", "1"), ("--adam-beta1=1.0", "[0, 1)")),
    Case("max grad norm negative", "mlx", lambda e: sft(e, "--max-grad-norm", "-1"),
         ("--max-grad-norm=-1.0",)),
    Case("zero grad patience negative", "mlx", lambda e: sft(e, "--zero-grad-patience", "-1"),
         ("--zero-grad-patience=-1",)),
    Case("yaml missing", "mlx", lambda e: sft(e, "--config", str(e.w / "none.yaml")),
         ("--config", "none.yaml: no such file")),
    Case("yaml duplicate key", "mlx", lambda e: yaml_config(e, "lora_rank: 4\nsteps: 2\n"
                                                              "lora_rank: 8\n"),
         ("run.yaml", "'lora_rank' appears twice (line 1 and line 3)")),
    Case("yaml not a mapping", "mlx", lambda e: yaml_config(e, "- 1\n- 2\n"),
         ("run.yaml: must be a mapping",)),
    Case("yaml invalid", "mlx", lambda e: yaml_config(e, "steps: [1, 2\n"),
         ("run.yaml: not valid YAML",)),
    Case("yaml unknown key", "mlx", lambda e: yaml_config(e, "learning_rat: 1e-4\n"),
         ("run.yaml: unknown key 'learning_rat'", "learning_rate")),
    Case("yaml nan", "mlx", lambda e: yaml_config(e, "learning_rate: .nan\n"),
         ("--learning-rate=nan", "finite")),
    Case("grpo reward timeout -1", "mlx", lambda e: grpo(e, "--reward-timeout", "-1"),
         ("--reward-timeout=-1.0", "> 0")),
    Case("grpo reward timeout nan", "mlx", lambda e: grpo(e, "--reward-timeout", "nan"),
         ("--reward-timeout=nan",)),
    Case("grpo one generation", "mlx", lambda e: grpo(e, "--num-generations", "1"),
         ("--num-generations=1", ">= 2")),
    Case("grpo weights count", "mlx", lambda e: grpo(e, "--reward-weights", "1", "2"),
         ("--reward-weights", "one weight per --reward")),
    Case("grpo temperature 0", "mlx", lambda e: grpo(e, "--temperature", "0"),
         ("--temperature=0.0", "> 0")),
    Case("grpo unscored patience negative", "mlx", lambda e: grpo(e, "--unscored-patience", "-2"),
         ("--unscored-patience=-2",)),
    # ---- data ----------------------------------------------------------------------------
    Case("data missing", "mlx", lambda e: sft(e, data=e.w / "nope.jsonl"),
         ("nope.jsonl: no such file or directory",)),
    Case("dir without train.jsonl", "mlx",
         lambda e: sft(e, data=bad_data(e, [GOOD_SFT], "valid.jsonl")),
         ("must contain train.jsonl; it holds valid.jsonl",)),
    Case("invalid json", "mlx", lambda e: sft(e, data=bad_data(e, [GOOD_SFT, '{"prompt": '])),
         ("train.jsonl:2: not valid JSON",)),
    Case("not an object", "mlx", lambda e: sft(e, data=bad_data(e, ["[1, 2]"])),
         ("train.jsonl:1: each line must be a JSON object",)),
    Case("lone surrogate", "mlx", lambda e: sft(e, data=bad_data(e, ['{"text": "\\ud800"}'])),
         ("train.jsonl:1:", '"text" holds a lone surrogate')),
    Case("lone surrogate in a message", "torch",
         lambda e: sft(e, data=bad_data(e, [GOOD_MSG, SURROGATE_MSG])),
         ("train.jsonl:2:", '"messages"[0]["content"] holds a lone surrogate')),
    Case("not utf-8", "mlx", lambda e: sft(e, data=latin1(e)),
         ("train.jsonl:1: line is not valid UTF-8",)),
    Case("duplicate key", "mlx",
         lambda e: sft(e, data=bad_data(e, ['{"prompt": "a", "completion": "b", "prompt": "c"}'])),
         ("train.jsonl:1: key 'prompt' appears twice",)),
    Case("unknown format", "mlx", lambda e: sft(e, data=bad_data(e, [{"question": "a"}])),
         ("train.jsonl:1:", "got keys ['question']")),
    Case("empty text", "mlx", lambda e: sft(e, data=bad_data(e, [{"text": "  "}])),
         ("train.jsonl:1:", '"text" is empty')),
    Case("mixed formats", "mlx", lambda e: sft(e, data=bad_data(e, [GOOD_SFT, {"text": "x"}])),
         ("train.jsonl:2:", "one file holds one format")),
    Case("tool call without a name", "mlx", lambda e: sft(e, data=bad_data(e, [
        {"messages": [{"role": "user", "content": "x"},
                      {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}])),
         ("train.jsonl:1:", '"tool_calls"[0] does not name its function')),
    Case("weight on a user turn", "mlx", lambda e: sft(e, data=bad_data(e, [
        {"messages": [{"role": "user", "content": "x", "weight": 0},
                      {"role": "assistant", "content": "y"}]}])),
         ("train.jsonl:1:", '"messages"[0] has "weight"')),
    Case("weight 0.5", "mlx", lambda e: sft(e, data=bad_data(e, [
        {"messages": [{"role": "user", "content": "x"},
                      {"role": "assistant", "content": "y", "weight": 0.5}]}])),
         ("train.jsonl:1:", '"weight" must be 0 (not trained) or 1')),
    Case("every weight 0", "mlx", lambda e: sft(e, data=bad_data(e, [
        {"messages": [{"role": "user", "content": "x"},
                      {"role": "assistant", "content": "y", "weight": 0}]}])),
         ("train.jsonl:1:", 'has "weight": 0, so nothing would be trained')),
    Case("unknown role", "mlx", lambda e: sft(e, data=bad_data(e, [
        {"messages": [{"role": "bot", "content": "x"}]}])), ("train.jsonl:1:", '"bot"')),
    Case("kto one label", "mlx", lambda e: sft(e, algo="kto", data=bad_data(e, [
        {"prompt": "q", "completion": f" {i}", "label": True} for i in range(3)])),
         ("train.jsonl: every KTO example is desirable", "needs both labels")),
    Case("dpo chosen equals rejected", "mlx", lambda e: sft(e, algo="dpo", data=bad_data(e, [
        {"prompt": "q", "chosen": " a", "rejected": " a"}])), ("train.jsonl:1:",)),
    Case("empty file", "mlx", lambda e: sft(e, data=bad_data(e, [""])),
         ("train.jsonl: no usable examples",)),
    Case("bad valid split", "mlx", lambda e: sft(e, data=with_valid(e, ['{"text": 1}'])),
         ("valid.jsonl:1:",)),
    Case("everything skipped", "mlx",
         lambda e: sft(e, "--skip-invalid", data=bad_data(e, ["{x", "[1]"])),
         ("no usable examples; all 2 were invalid",)),
    Case("grpo prompt missing", "mlx", lambda e: grpo(e, data=bad_data(e, [{"question": "q"}])),
         ("train.jsonl:1:", 'each line needs a "prompt"')),
    Case("grpo reserved column", "mlx",
         lambda e: grpo(e, data=bad_data(e, [{"prompt": "q", "step": 1}])),
         ("train.jsonl:1:", "column 'step' clashes")),
    Case("grpo reward file missing", "mlx", lambda e: grpo(e, reward=f"{e.w}/none.py:f"),
         ("--reward", "none.py", "file not found")),
    # ---- model ---------------------------------------------------------------------------
    Case("unknown model name", "mlx", lambda e: sft(e, model=Path("no-such-model")),
         ("--model no-such-model", "neither a known model")),
    Case("dir without config.json", "mlx", lambda e: sft(e, model=without(e, "config.json")),
         ("--model", "has no config.json")),
    Case("config not json (mlx)", "mlx", lambda e: sft(e, model=edited_config(e, "{oops")),
         ("config.json: not valid JSON",)),
    Case("config not json (torch)", "torch", lambda e: sft(e, model=edited_config(e, "[1,")),
         ("config.json: not valid JSON",)),
    Case("config duplicate key", "mlx",
         lambda e: sft(e, model=edited_config(e, '{"model_type": "llama", "model_type": "x"}')),
         ("config.json: key 'model_type' appears twice",)),
    Case("config without model_type", "torch", lambda e: sft(e, model=edited_config(e, "{}")),
         ('config.json: no "model_type"',)),
    Case("truncated weights (mlx)", "mlx", lambda e: sft(e, model=truncated(e)),
         ("model.safetensors: truncated",)),
    Case("truncated weights (torch)", "torch", lambda e: sft(e, model=truncated(e, "qwen")),
         ("model.safetensors: truncated",)),
    Case("garbage weights", "torch", lambda e: sft(e, model=garbage_weights(e)),
         ("model.safetensors: not a safetensors file, or truncated",)),
    Case("no safetensors", "mlx", lambda e: sft(e, model=without(e, "model.safetensors")),
         ("no *.safetensors weights",)),
    Case("index lists a missing shard", "torch",
         lambda e: sft(e, model=indexed_with_missing_shard(e)),
         ("model-00002-of-00002.safetensors: listed in", "index.json but missing")),
    Case("no tokenizer (mlx)", "mlx", lambda e: sft(e, model=without(e, "tokenizer.json")),
         ("no tokenizer (tokenizer.json",)),
    Case("no tokenizer (torch)", "torch", lambda e: sft(e, model=without(e, "tokenizer.json")),
         ("no tokenizer (tokenizer.json",)),
    Case("wrong shapes (mlx)", "mlx", lambda e: sft(e, model=edited_weights(e, reshape="q_proj")),
         ("the weights do not fit the config", "(3, 3)")),
    Case("wrong shapes (torch)", "torch",
         lambda e: sft(e, model=edited_weights(e, reshape="q_proj")),
         ("has the wrong shape", "(3, 3)")),
    Case("missing tensor (mlx)", "mlx", lambda e: sft(e, model=edited_weights(e, drop="k_proj")),
         ("the weights do not fit the config", "k_proj")),
    Case("missing tensor (torch)", "torch",
         lambda e: sft(e, model=edited_weights(e, drop="k_proj")),
         ("the weights lack 1 tensor(s)", "k_proj", "refusing to train")),
    Case("unknown architecture (mlx)", "mlx",
         lambda e: sft(e, model=edited_config(e, model_type="bogus")),
         ("model_type 'bogus' is not an architecture mlx-lm can build",)),
    Case("unknown architecture (torch)", "torch",
         lambda e: sft(e, model=edited_config(e, model_type="bogus")),
         ("model_type 'bogus' is not an architecture transformers knows",)),
    Case("not a causal LM (torch)", "torch",
         lambda e: sft(e, model=edited_config(e, model_type="vit")),
         ("model_type 'vit' is not a causal language model",)),
    Case("mlx-quantised dir to torch", "torch", lambda e: sft(e, model=e.mlx_q4),
         ("an MLX-quantised model (4-bit", "python -m converters mlx-to-hf")),
    Case("target modules match nothing (mlx)", "mlx",
         lambda e: sft(e, "--target-modules", "nope_proj"),
         ("--target-modules nope_proj: no such linear layer", "available: mlp.down_proj")),
    Case("target modules match nothing (torch)", "torch",
         lambda e: sft(e, "--target-modules", "nope_proj"),
         ("--target-modules nope_proj: no such linear layer", "available: mlp.down_proj")),
    Case("one target matches nothing (torch)", "torch",
         lambda e: sft(e, "--target-modules", "q_proj", "nope"),
         ("--target-modules nope: no such linear layer",)),
    Case("more checkpointed blocks than the model has (mlx)", "mlx",
         lambda e: sft(e, "--grad-checkpoint-blocks", "99"),
         ("--grad-checkpoint-blocks 99: the model has", "transformer blocks")),
    Case("more checkpointed blocks than the model has (torch)", "torch",
         lambda e: sft(e, "--grad-checkpoint-blocks", "99"),
         ("--grad-checkpoint-blocks 99: the model has", "transformer blocks")),
    Case("negative checkpointed blocks", "mlx", lambda e: sft(e, "--grad-checkpoint-blocks", "-1"),
         ("--grad-checkpoint-blocks=-1", "must be >= 0")),
    # ---- converters ----------------------------------------------------------------------
    Case("force over a file", "converters",
         lambda e: ["hf-to-mlx", str(e.model), str(a_file(e)), "--force"],
         ("out: is a file, not a directory",)),
    Case("force over a stranger's dir", "converters",
         lambda e: ["hf-to-mlx", str(e.model), str(a_dir(e)), "--force"],
         ("out: is not an output of hf-to-mlx", "--force replaces only")),
    Case("force over another verb's output", "converters",
         lambda e: ["mlx-to-hf", str(e.mlx_q4), str(e.copy(e.mlx_q4, "out")), "--force"],
         ("out: is an output of hf-to-mlx",)),
    Case("exists without force", "converters",
         lambda e: ["mlx-to-hf", str(e.mlx_q4), str(a_dir(e))], ("out: already exists",)),
    Case("source missing", "converters",
         lambda e: ["hf-to-mlx", str(e.w / "nope"), str(e.w / "out")], ("nope",)),
    Case("bad bits", "converters",
         lambda e: ["hf-to-mlx", str(e.model), str(e.w / "out"), "--bits", "7"], ("bits",)),
    Case("truncated source weights", "converters",
         lambda e: ["hf-to-mlx", str(truncated(e)), str(e.w / "out")],
         ("model.safetensors: truncated",)),
    Case("gguf over a directory", "converters",
         lambda e: ["hf-to-gguf", str(e.model), str(a_dir(e, "out.gguf")), "--force"],
         ("out.gguf: is a directory, not a file",)),
    Case("gguf over a non-gguf file", "converters",
         lambda e: ["hf-to-gguf", str(e.model), str(a_file(e, "out.gguf")), "--force"],
         ("out.gguf: is not a previous output",)),
    Case("not a gguf", "converters",
         lambda e: ["gguf-to-hf", str(a_file(e, "in.gguf", b"nope" * 8)), str(e.w / "out")],
         ("in.gguf",)),
    Case("fuse onto other weights", "converters",
         lambda e: ["fuse", "--format", "hf", str(e.model), str(adapter_for_other_weights(e)),
                    str(e.w / "out")], ("whose weights differ", "--ignore-base-fingerprint")),
    Case("fuse bad format", "converters",
         lambda e: ["fuse", "--format", "onnx", str(e.model), str(e.adapter), str(e.w / "o")],
         ("--format", "invalid choice")),
    Case("unknown verb", "converters", lambda e: ["hf-to-onnx"], ("invalid choice",)),
    Case("info on nothing", "converters", lambda e: ["info", str(e.w / "nope")], ("nope",)),
    Case("disk full (converters)", "converters",
         lambda e: (disk_full(e), ["hf-to-mlx", str(e.model), str(e.w / "out")])[1],
         ("out: disk full",)),
    # ---- rewards -------------------------------------------------------------------------
    Case("score: file missing", "rewards", lambda e: score(e, None), ("missing.jsonl: no such",)),
    Case("score: bad json", "rewards", lambda e: score(e, [{"completion": "a"}, "{x"]),
         ("rows.jsonl:2: not valid JSON",)),
    Case("score: no completion", "rewards", lambda e: score(e, [{"prompt": "a"}]),
         ("rows.jsonl:1:", '"completion"')),
    Case("score: unknown reward", "rewards", lambda e: score(e, [{"completion": "a"}],
                                                           reward="nope"),
         ("reward 'nope'", "no built-in")),
    Case("score: reward file missing", "rewards",
         lambda e: score(e, [{"completion": "a"}], reward=f"{e.w}/none.py:f"),
         ("none.py", "file not found")),
    Case("score: reward import fails", "rewards",
         lambda e: score(e, [{"completion": "a"}], reward=broken_plugin(e)),
         ("failed to import", "ZeroDivisionError")),
    Case("score: sys.exit in a reward", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--out", str(e.w / "s.jsonl"), reward="quits"),
         ("reward function 'quits' raised SystemExit(0)",)),
    Case("score: KeyboardInterrupt in a reward", "rewards",
         lambda e: score(e, [{"completion": "a"}], reward="interrupts"),
         ("'interrupts' raised KeyboardInterrupt()",)),
    Case("score: async reward blocks", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--timeout", "0.3", reward="blocks"),
         ("'blocks' timed out after 0.3 s",)),
    Case("score: timeout -1", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--timeout", "-1"), ("--timeout -1.0",)),
    Case("score: timeout nan", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--timeout", "nan"), ("--timeout nan",)),
    Case("score: reward returns nan", "rewards",
         lambda e: score(e, [{"completion": "a"}], reward="nan"),
         ("'nan' returned nan for sample 0",)),
    Case("score: wrong length", "rewards",
         lambda e: score(e, [{"completion": "a"}, {"completion": "b"}], reward="short"),
         ("'short' returned 1 values for 2 completions",)),
    Case("score: weights count", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--reward-weights", "1,2"),
         ("--reward-weights '1,2'",)),
    Case("score: out is a dir", "rewards",
         lambda e: score(e, [{"completion": "a"}], "--out", str(a_dir(e))),
         ("--out", "is a directory")),
    Case("score: disk full", "rewards",
         lambda e: (disk_full(e), score(e, [{"completion": "a"}], "--out",
                                        str(e.w / "s.jsonl")))[1], ("s.jsonl: disk full",)),
    Case("score: code_exec without a sandbox", "rewards",
         lambda e: (no_sandbox_tool(e), score(e, [{"completion": "a"}], reward="code_exec"))[1],
         ("refusing to run model-written code: bwrap is missing", "--allow-weak-sandbox")),
    # ---- resume and run dirs -------------------------------------------------------------
    Case("resume without a checkpoint", "mlx", lambda e: sft(e, "--resume"),
         ("--resume: no complete checkpoint",)),
    Case("resume changes lr", "mlx",
         lambda e: resume(e, "--learning-rate", "5e-4"), ("learning_rate=0.0001",)),
    Case("resume changes batch size", "mlx", lambda e: resume(e, "--batch-size", "1"),
         ("batch_size=2",)),
    Case("resume on another model", "mlx", lambda e: resume(e, model=e.qwen), ("model=",)),
    Case("resume on another backend", "torch", lambda e: resume(e),
         ("written by the mlx backend; this is the torch backend",)),
    Case("resume with other data", "mlx", lambda e: resume(e, edit=cut_data),
         ("the train data changed since the checkpoint", "3 examples now")),
    Case("resume steps below", "mlx", lambda e: resume(e, steps="1"),
         ("--steps 1 is below the checkpoint's step 2",)),
    Case("resume a finished run", "mlx", lambda e: resume(e, steps="2"),
         ("already finished at step 2",)),
    Case("resume with every checkpoint corrupt", "mlx",
         lambda e: resume(e, edit=corrupt_all_checkpoints),
         ("--resume: no complete checkpoint", "2 incomplete or corrupt", "trainable.safetensors")),
    Case("fresh run over checkpoints", "mlx",
         lambda e: (e.run_copy(), sft(e, data=Path("data"), run=Path("run")))[1],
         ("already holds checkpoints; pass --resume",)),
    Case("run dir is a file", "mlx", lambda e: sft(e, run=a_file(e, "run")),
         ("--run-dir", "is a file, not a directory")),
    Case("run dir in use", "mlx", lambda e: sft(e, run=locked(e)),
         ("another run is using it right now",)),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    return make_shared(tmp_path_factory.mktemp("bad_inputs_shared"), tiny_llama_dir,
                       tiny_qwen2_dir)


def test_the_table_is_large_and_covers_every_area():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == {"mlx", "torch", "converters", "rewards"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, shared, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    work.mkdir()
    env = Env(work, shared["model"], shared["qwen"], shared["mlx_q4"], shared["adapter"],
              shared["sft"], shared["prompts"], shared["resume_base"], monkeypatch)
    argv = case.argv(env)
    before = snapshot(work)
    try:
        if case.tool in ("mlx", "torch"):
            code = run_cli(*(MLX if case.tool == "mlx" else TORCH), argv)
        elif case.tool == "converters":
            code = converters_main(argv)
        else:
            code = rewards_main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        for fd in env.extra_fds:
            os.close(fd)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == case.code, err
    assert len(errors) == 1, err
    for fragment in case.says:
        assert fragment in errors[0], errors[0]
    assert snapshot(work) == before, "the command left something behind or changed its inputs"
