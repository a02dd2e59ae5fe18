"""Inputs and helpers for ``test_bad_inputs.py``: the work-dir environment each row gets, the
argument builders, and the corruptions (models, run dirs, converter outputs) rows apply."""

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


def latin1(env: Env) -> Path:
    path = env.w / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    return path.parent


def with_valid(env: Env, lines: list) -> Path:
    data = bad_data(env, [GOOD_SFT] * 4)
    (data / "valid.jsonl").write_text("".join(x + "\n" for x in lines))
    return data


def broken_plugin(env: Env) -> str:
    (env.w / "broken.py").write_text("1 / 0\n")
    return f"{env.w / 'broken.py'}:f"


def resume(env: Env, *extra: str, steps: str = "4", model: Path | None = None,
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


def make_shared(root: Path, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> dict[str, Path]:
    """The read-only inputs rows share: data, a finished run (trained with relative paths),
    prompts and rewards, an MLX-quantised model, a PEFT adapter."""
    from test_convert_adapters import make_peft_adapter

    from algorithms.cli import run_cli
    from converters.__main__ import main as converters_main

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
