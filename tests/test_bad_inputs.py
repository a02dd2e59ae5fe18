"""Bad inputs, one row each: every CLI answers with exit code 2 and ONE ``error:`` line naming
the file/line or flag and the rule, never a traceback, and leaves nothing new on disk.

Rows run in-process through each CLI's ``main(argv)``: ``python -m mlx_ft`` / ``cuda_ft``
(``run_cli``), ``python -m converters`` and ``python -m rewards``. Each row gets a fresh work
dir (its inputs are copied or written there); the dir is snapshotted (paths and bytes) before
and after, so a half-written output, a refused ``--resume`` that touched ``config.json``, or a
stray lock file fails the row.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_convert_adapters import make_peft_adapter

from algorithms.cli import run_cli
from converters.__main__ import main as converters_main
from rewards.__main__ import main as rewards_main

pytest.importorskip("mlx")
pytest.importorskip("torch")

MLX = ("mlx_ft", "mlx_ft.backend:MLXBackend")
TORCH = ("cuda_ft", "cuda_ft.backend:TorchBackend")
GOOD_SFT = {"prompt": "say red", "completion": " red red"}
SURROGATE_MSG = '{"messages": [{"role": "user", "content": "x\\udfff"}]}'
GOOD_MSG = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
REWARDS = '''
import sys, time

def quits(prompts, completions, **kw):
    sys.exit(0)

def interrupts(prompts, completions, **kw):
    raise KeyboardInterrupt

async def blocks(prompts, completions, **kw):
    time.sleep(5)

def nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)

def short(prompts, completions, **kw):
    return [1.0]

def ok(prompts, completions, **kw):
    return [1.0] * len(completions)
'''


@dataclass
class Env:
    """What a row may use: shared read-only inputs, and its own work dir ``w``."""

    w: Path
    model: Path
    qwen: Path
    mlx_q4: Path
    adapter: Path
    sft: Path
    prompts: Path
    resume_base: Path
    monkeypatch: pytest.MonkeyPatch
    extra_fds: list = field(default_factory=list)

    def write(self, name: str, lines: list) -> Path:
        path = self.w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                for x in lines))
        return path

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.w / name))

    def model_copy(self, family: str = "llama") -> Path:
        return self.copy(self.model if family == "llama" else self.qwen, "model")

    def run_copy(self) -> Path:
        """The finished run and its data, copied into the work dir, which becomes the cwd: the
        run was trained with the relative paths ``--data data --run-dir run``."""
        self.copy(self.resume_base / "data", "data")
        self.monkeypatch.chdir(self.w)
        return self.copy(self.resume_base / "run", "run")


@dataclass
class Case:
    name: str
    tool: str  # mlx | torch | converters | rewards
    argv: Callable[[Env], list[str]]
    says: tuple[str, ...]
    code: int = 2
    extra: dict = field(default_factory=dict)


def sft(env: Env, *extra: str, data: Path | None = None, model: Path | None = None,
        run: Path | None = None, algo: str = "sft") -> list[str]:
    return [algo, "--model", str(model or env.model), "--data", str(data or env.sft),
            "--run-dir", str(run or env.w / "run"), "--steps", "2", "--batch-size", "2",
            "--max-length", "32", "--no-progress", *extra]


def grpo(env: Env, *extra: str, data: Path | None = None, reward: str | None = None) -> list[str]:
    reward = reward or f"{env.prompts.parent / 'rewards.py'}:ok"
    return ["grpo", "--model", str(env.model), "--data", str(data or env.prompts), "--run-dir",
            str(env.w / "run"), "--reward", reward,
            "--steps", "1", "--prompts-per-step", "1", "--num-generations", "2",
            "--max-completion-length", "4", "--max-length", "32", "--no-progress", *extra]


def bad_data(env: Env, lines: list, name: str = "train.jsonl") -> Path:
    return env.write(f"data/{name}", lines).parent


def score(env: Env, rows: list | None, *extra: str, reward: str = "ok") -> list[str]:
    data = env.write("rows.jsonl", rows) if rows is not None else env.w / "missing.jsonl"
    spec = reward if ":" in reward or reward in ("json_valid", "nope", "code_exec") \
        else f"{env.prompts.parent / 'rewards.py'}:{reward}"
    return ["score", str(data), "--reward", spec, *extra]


def yaml_config(env: Env, text: str) -> list[str]:
    (env.w / "run.yaml").write_text(text)
    return sft(env, "--config", str(env.w / "run.yaml"))


# --- model corruptions --------------------------------------------------------------------
def truncated(env: Env, family: str = "llama") -> Path:
    model = env.model_copy(family)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5000])
    return model


def garbage_weights(env: Env) -> Path:
    model = env.model_copy()
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    return model


def edited_config(env: Env, text: str | None = None, **changes) -> Path:
    model = env.model_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(text if text is not None else json.dumps(config))
    return model


def without(env: Env, *names: str) -> Path:
    model = env.model_copy()
    for name in names:
        (model / name).unlink()
    return model


def edited_weights(env: Env, drop: str | None = None, reshape: str | None = None) -> Path:
    model = env.model_copy()
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if (drop or reshape) in k)
    if drop:
        del weights[key]
    else:
        weights[key] = np.zeros((3, 3), dtype=weights[key].dtype)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def indexed_with_missing_shard(env: Env) -> Path:
    model = env.model_copy()
    keys = list(load_file(str(model / "model.safetensors")))
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    index["weight_map"][keys[0]] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


# --- converter helpers --------------------------------------------------------------------
def a_file(env: Env, name: str = "out", content: bytes = b"precious") -> Path:
    (env.w / name).write_bytes(content)
    return env.w / name


def a_dir(env: Env, name: str = "out") -> Path:
    (env.w / name).mkdir()
    (env.w / name / "notes.txt").write_text("mine")
    return env.w / name


def disk_full(env: Env) -> None:
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    env.monkeypatch.setattr("converters.atomic._normalise_permissions", no_space)
    env.monkeypatch.setattr("converters.atomic.os.fsync", no_space)


def adapter_for_other_weights(env: Env) -> Path:
    adapter = env.copy(env.adapter, "adapter")
    (adapter / "posttrain_base.json").write_text(json.dumps({
        "base_model": "/elsewhere", "base_fingerprint": "0" * 64,
        "architecture": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                         "intermediate_size": 128, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 384}}))
    config = json.loads((env.model / "config.json").read_text())
    record = json.loads((adapter / "posttrain_base.json").read_text())
    record["architecture"] = {k: config.get(k) for k in record["architecture"]}
    (adapter / "posttrain_base.json").write_text(json.dumps(record))
    return adapter


# --- resume helpers -----------------------------------------------------------------------
def corrupt_all_checkpoints(env: Env) -> None:
    for ckpt in (env.w / "run" / "checkpoints").iterdir():
        weights = ckpt / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])


def cut_data(env: Env) -> None:
    lines = (env.w / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    (env.w / "data" / "train.jsonl").write_text("".join(lines[:3]))


def no_sandbox_tool(env: Env) -> None:
    from rewards import sandbox

    env.monkeypatch.setattr(sandbox, "_tool", sandbox.SandboxTool("weak", "bwrap is missing"))


def locked(env: Env) -> Path:
    run = env.w / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another run would
    env.extra_fds.append(fd)
    return run


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
    Case("not utf-8", "mlx", lambda e: sft(e, data=_latin1(e)),
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
    Case("bad valid split", "mlx", lambda e: sft(e, data=_with_valid(e, ['{"text": 1}'])),
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
         lambda e: score(e, [{"completion": "a"}], reward=_broken_plugin(e)),
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
         lambda e: _resume(e, "--learning-rate", "5e-4"), ("learning_rate=0.0001",)),
    Case("resume changes batch size", "mlx", lambda e: _resume(e, "--batch-size", "1"),
         ("batch_size=2",)),
    Case("resume on another model", "mlx", lambda e: _resume(e, model=e.qwen), ("model=",)),
    Case("resume on another backend", "torch", lambda e: _resume(e),
         ("written by the mlx backend; this is the torch backend",)),
    Case("resume with other data", "mlx", lambda e: _resume(e, edit=cut_data),
         ("the train data changed since the checkpoint", "now has 3")),
    Case("resume steps below", "mlx", lambda e: _resume(e, steps="1"),
         ("--steps 1 is below the checkpoint's step 2",)),
    Case("resume a finished run", "mlx", lambda e: _resume(e, steps="2"),
         ("already finished at step 2",)),
    Case("resume with every checkpoint corrupt", "mlx",
         lambda e: _resume(e, edit=corrupt_all_checkpoints),
         ("--resume: no complete checkpoint", "2 incomplete or corrupt", "trainable.safetensors")),
    Case("fresh run over checkpoints", "mlx",
         lambda e: (e.run_copy(), sft(e, data=Path("data"), run=Path("run")))[1],
         ("already holds checkpoints; pass --resume",)),
    Case("run dir is a file", "mlx", lambda e: sft(e, run=a_file(e, "run")),
         ("--run-dir", "is a file, not a directory")),
    Case("run dir in use", "mlx", lambda e: sft(e, run=locked(e)),
         ("another run is using it right now",)),
]


def _latin1(env: Env) -> Path:
    path = env.w / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    return path.parent


def _with_valid(env: Env, lines: list) -> Path:
    data = bad_data(env, [GOOD_SFT] * 4)
    (data / "valid.jsonl").write_text("".join(x + "\n" for x in lines))
    return data


def _broken_plugin(env: Env) -> str:
    (env.w / "broken.py").write_text("1 / 0\n")
    return f"{env.w / 'broken.py'}:f"


def _resume(env: Env, *extra: str, steps: str = "4", model: Path | None = None,
            edit: Callable[[Env], None] | None = None) -> list[str]:
    env.run_copy()
    if edit is not None:
        edit(env)
    argv = sft(env, *extra, "--resume", data=Path("data"), run=Path("run"), model=model)
    argv[argv.index("--steps") + 1] = steps
    return argv


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    root = tmp_path_factory.mktemp("bad_inputs_shared")
    sft_dir = root / "sft"
    sft_dir.mkdir()
    words = ["red", "blue", "green", "cat"]
    rows = [{"prompt": f"say {w}", "completion": f" {w} {w}"} for w in words * 2]
    (sft_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resume_base = root / "resume_base"
    shutil.copytree(sft_dir, resume_base / "data")
    argv = ["sft", "--model", str(tiny_llama_dir), "--data", "data", "--run-dir", "run",
            "--steps", "2", "--batch-size", "2", "--max-length", "32", "--no-progress",
            "--save-every", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(resume_base)
        assert run_cli(*MLX, argv) == 0
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "train.jsonl").write_text(json.dumps({"prompt": "say hi"}) + "\n")
    (prompts / "rewards.py").write_text(REWARDS)
    mlx_q4 = root / "mlx_q4"
    assert converters_main(["hf-to-mlx", str(tiny_llama_dir), str(mlx_q4), "--bits", "4",
                            "--group-size", "32"]) == 0
    adapter = make_peft_adapter(tiny_llama_dir, root / "peft", dora=False, targets=["q_proj"])
    return {"model": tiny_llama_dir, "qwen": tiny_qwen2_dir, "mlx_q4": mlx_q4,
            "adapter": adapter, "sft": sft_dir, "prompts": prompts / "train.jsonl",
            "resume_base": resume_base}


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
