"""``generate`` and ``chat``: the model (with an adapter from either backend) answering prompts.

    python -m mlx_ft generate --model M --adapter runs/x/adapters --prompt "Hi" --temperature 0
    python -m cuda_ft generate --model M --prompts prompts.jsonl --out completions.jsonl
    python -m mlx_ft chat --model M --adapter runs/x/adapters --system "Be brief."

Sampling is the backend's batched rollout sampler (``Backend.sample``: KV cache, temperature,
top-k, top-p, min-p in transformers' order, stop strings, a seed), so a completion here is what
training would have sampled. ``--temperature 0`` is greedy decoding (the most likely token each
step, the same tokens as mlx-lm's and transformers' own greedy generation). A prompt is a user
message rendered with the chat template (after ``--system``), or the raw text with
``--raw-prompt``. ``--prompts`` reads JSONL: ``{"prompt": "..." or [messages]}`` or
``{"messages": [...]}``; other keys (an ``id``...) are copied to the output line, which adds
``completion``, ``finish_reason`` (eos, stop, length) and ``completion_tokens``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, _bad, field


@dataclasses.dataclass
class GenerateConfig:
    """Generate completions with a model and, optionally, an adapter (mlx-lm or PEFT)."""

    model: str = field("smollm2-135m", "HF model dir, or a known short name")
    adapter: str = field("", "adapter dir (mlx-lm or PEFT, e.g. runs/x/adapters); empty = none")
    prompt: str = field("", "one prompt (a user message; see --raw-prompt)")
    prompts: str = field("", "JSONL of prompts: {\"prompt\": ...} or {\"messages\": [...]} per line")
    out: str = field("", "write the JSONL here instead of standard output")
    system: str = field("", "system message put before every prompt")
    raw_prompt: bool = field(False, "feed prompts as raw text, without the chat template")
    chat_template: str = field(
        "", "chat template: a built-in name (chatml, llama3, gemma) or a Jinja file; empty = the "
        "adapter's saved chat_template.jinja, else the model's own")
    max_tokens: int = field(256, "tokens generated per completion at most")
    temperature: float = field(0.0, "sampling temperature; 0 = greedy")
    top_p: float = field(1.0, "nucleus sampling threshold; 1 = off")
    top_k: int = field(0, "keep the k most likely tokens; 0 = off")
    min_p: float = field(0.0, "drop tokens below min_p x the top probability; 0 = off")
    stop: list = field([], "stop strings (repeatable); the string is kept", split=False)  # noqa: RUF009
    seed: int = field(0, "sampling seed: the same seed gives the same completions")
    batch_size: int = field(8, "prompts sampled at once")
    dtype: str = field("auto", "compute dtype", ["auto", "float32", "bfloat16", "float16"])
    quantize_base: int = field(0, "quantise a float base at load to 4 or 8 bits; 0 = off")
    quantize_group_size: int = field(64, "group size of --quantize-base")

    def validate(self, one_prompt_source: bool = True) -> None:
        if one_prompt_source and bool(self.prompt) == bool(self.prompts):
            _bad("prompt", self.prompt, "give one prompt (--prompt) or a file (--prompts)")
        for name in ("max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "must be >= 1")
        if not 0 <= self.temperature < float("inf"):
            _bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0:
            _bad("top_k", self.top_k, "must be >= 0")
        if not 0 <= self.min_p < 1:
            _bad("min_p", self.min_p, "must be in [0, 1)")
        if not 0 <= self.seed < 2**32:
            _bad("seed", self.seed, "must be in [0, 2**32)")
        if any(not s for s in self.stop):
            _bad("stop", self.stop, "stop strings must not be empty")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _bad("dtype", self.dtype, "must be auto, float32, bfloat16 or float16")

    def sampling(self, batch_size: int | None = None) -> Any:
        from .rl.sampling import SamplingParams

        greedy = self.temperature == 0
        return SamplingParams(max_tokens=self.max_tokens,
                              temperature=1.0 if greedy else self.temperature,
                              top_p=1.0 if greedy else self.top_p,
                              top_k=1 if greedy else self.top_k,
                              min_p=0.0 if greedy else self.min_p, stop=tuple(self.stop),
                              batch_size=batch_size or self.batch_size)


def load_backend(prog: str, backend_spec: str, gcfg: GenerateConfig) -> Any:
    """The backend holding the model and ``--adapter`` (either format), ready to sample."""
    from .adapter_io import adopt_settings, read_adapter_weights
    from .cli import UserError, check_run_options, load_backend_class, open_model
    from .config import TrainConfig
    from .data.templates import template_for
    from .model_check import ModelError

    model_path, model_config, tokenizer = open_model(
        gcfg.model, template_for(gcfg.chat_template, gcfg.adapter), prog)
    cfg = TrainConfig(model=gcfg.model, data="-", seed=gcfg.seed, dtype=gcfg.dtype,
                      quantize_base=gcfg.quantize_base,
                      quantize_group_size=gcfg.quantize_group_size, lora_rank=1)
    try:
        cfg.validate()
        backend_cls = load_backend_class(backend_spec)
        backend_model = sys.modules[backend_cls.__module__.rsplit(".", 1)[0] + ".model"]
        if hasattr(backend_model, "check_model"):
            backend_model.check_model(model_path, model_config)
        check_run_options(cfg, backend_model, model_path)
        adapter = read_adapter_weights(gcfg.adapter, "--adapter", model_path) \
            if gcfg.adapter else None
        if adapter is not None:
            adopt_settings(cfg, adapter)
        backend = backend_cls(cfg, model_path, tokenizer)
        if adapter is not None:
            backend.load_adapter_weights(adapter.weights)
    except (ConfigError, ModelError, ValueError) as e:
        raise UserError(str(e)) from None
    return backend


def prompt_ids(tokenizer: Any, messages: Any, raw: bool) -> list[int]:
    """Token ids of a prompt: raw text, or messages rendered with the generation prompt."""
    if isinstance(messages, str) and raw:
        return list(tokenizer(messages)["input_ids"])
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use --raw-prompt")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def read_prompts(gcfg: GenerateConfig) -> list[dict]:
    """``[{"prompt": str | messages, ...other keys}]`` from ``--prompt`` or ``--prompts``."""
    if gcfg.prompt:
        return [{"prompt": gcfg.prompt}]
    path = Path(gcfg.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("prompt"), (str, list))
                                             or isinstance(row.get("messages"), list)):
            raise ValueError(f"{path}:{number}: needs \"prompt\" (text or messages) or "  # noqa: TRY004
                             f"\"messages\"; got {line[:60]!r}")
        if "messages" in row and "prompt" not in row:
            row["prompt"] = row.pop("messages")
        rows.append(row)
    if not rows:
        raise ValueError(f"--prompts {path}: holds no prompts")
    return rows


def conversation(gcfg: GenerateConfig, prompt: Any) -> Any:
    if gcfg.raw_prompt and isinstance(prompt, str):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if gcfg.system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": gcfg.system}, *messages]
    return messages


def generate_rows(backend: Any, gcfg: GenerateConfig, rows: list[dict]) -> list[dict]:
    ids = [prompt_ids(backend.tokenizer, conversation(gcfg, r["prompt"]), gcfg.raw_prompt)
           for r in rows]
    completions = backend.sample(ids, gcfg.sampling(), gcfg.seed)
    return [{**row, "completion": c.text, "finish_reason": c.finish_reason,
             "completion_tokens": len(c.ids)} for row, c in zip(rows, completions)]


def _parse(prog: str, verb: str, argv: list[str], one_source: bool) -> GenerateConfig:
    from .config import build_config

    class Cfg(GenerateConfig):
        def validate(self) -> None:
            GenerateConfig.validate(self, one_source)

    cfg = build_config(dataclasses.dataclass(Cfg), argv, prog=f"python -m {prog} {verb}")
    return GenerateConfig(**dataclasses.asdict(cfg))


def generate_main(prog: str, backend_spec: str, argv: list[str]) -> int:
    from .cli import UserError

    try:
        gcfg = _parse(prog, "generate", argv, True)
        rows = read_prompts(gcfg)
        backend = load_backend(prog, backend_spec, gcfg)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                       for r in generate_rows(backend, gcfg, rows))
        if gcfg.out:
            from converters.atomic import write_text_atomically

            write_text_atomically(gcfg.out, text)
        else:
            sys.stdout.write(text)
    except (ConfigError, UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def chat_main(prog: str, backend_spec: str, argv: list[str]) -> int:
    """An interactive chat: each line is a user turn; ``/reset`` clears the history,
    ``/system TEXT`` sets the system message, ``/exit`` (or end of input) quits."""
    from .cli import UserError

    try:
        gcfg = _parse(prog, "chat", argv, False)
        backend = load_backend(prog, backend_spec, gcfg)
    except (ConfigError, UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tty = sys.stdin.isatty()
    if tty:
        print("chat: /reset clears the history, /system TEXT sets the system message, /exit "
              "quits", file=sys.stderr)
    history: list[dict] = []
    turn = 0
    while True:
        if tty:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = []
            continue
        if text.startswith("/system"):
            gcfg.system = text[len("/system"):].strip()
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        messages = conversation(dataclasses.replace(gcfg, raw_prompt=False), history)
        ids = prompt_ids(backend.tokenizer, messages, False)
        (completion,) = backend.sample([ids], gcfg.sampling(1), gcfg.seed + turn)
        turn += 1
        history.append({"role": "assistant", "content": completion.text})
        print(completion.text, flush=True)
