"""Config dataclasses: the one source of defaults, CLI flags and YAML keys.

Every algorithm has one dataclass (``SFTConfig`` ...) that extends ``TrainConfig``. Its fields'
``metadata`` (``help``, ``choices``) generate the command-line flags of both ``python -m mlx_ft``
and ``python -m cuda_ft``; ``--config run.yaml`` sets any field; flags given on the command line
override the YAML; an unknown key or flag is an error naming the nearest valid one. Validation
happens here, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A flag, YAML key or value broke a rule; the message names it and the rule."""


def field(default: Any, help: str, choices: Sequence[Any] | None = None,
          aliases: Sequence[str] = (), raw: bool = False, split: bool = True,
          **kw) -> Any:
    """A dataclass field carrying its CLI help text (and allowed values, and other names the
    field answers to: the names TRL gives the same option, e.g. ``kl_coef`` for ``beta``).

    List fields: a repeated flag adds to the list (``--reward a --reward b``); with ``split``
    each value is also cut at commas and spaces (``--reward-weights 1,0.5`` or ``"1 0.5"``);
    fields whose items may hold commas or spaces (reward specs, stop strings) say
    ``split=False``; a ``raw`` list keeps its items as given (strings, or YAML mappings)."""
    meta: dict[str, Any] = {"help": help, "split": split}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if aliases:
        meta["aliases"] = tuple(aliases)
    if raw:
        meta["raw"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta, **kw)


@dataclasses.dataclass
class TrainConfig:
    """Options every training algorithm shares (model, data, adapters, optimiser, loop)."""

    # model and adapters
    model: str = field("smollm2-135m", "HF model dir, Hugging Face Hub id (the local cache first), "
                       "or a known short name (e.g. smollm2-135m)")
    fine_tune_type: str = field("lora", "which weights are trained", ["lora", "dora", "full"])
    lora_rank: int = field(8, "LoRA/DoRA rank r")
    lora_alpha: float = field(16.0, "LoRA/DoRA alpha; the update is scaled by alpha / rank")
    lora_dropout: float = field(0.0, "dropout on the LoRA input, in [0, 1)")
    target_modules: list = field(  # noqa: RUF009 (field() returns a default_factory field)
        [], "module names to adapt (e.g. q_proj v_proj); empty = every linear layer of every block"
    )
    init_adapter: str = field(
        "", "start from this LoRA adapter (mlx-lm or PEFT dir, e.g. runs/sft/adapters): it stays "
        "frozen and a new adapter trains on top; the reference (DPO, KTO, the online KL) is the "
        "base with it; the saved adapter holds both (rank = the two ranks added)")
    quantize_base: int = field(
        0, "quantise a float base at load to 4 or 8 bits and train adapters on it (QLoRA); "
        "mlx_ft: MLX affine quantisation; cuda_ft: bitsandbytes NF4 / int8 (CUDA only); 0 = off")
    quantize_group_size: int = field(64, "group size of --quantize-base (32, 64 or 128; MLX)")
    dtype: str = field(
        "auto", "compute dtype; auto = bfloat16 on a GPU, float32 on CPU",
        ["auto", "float32", "bfloat16", "float16"],
    )
    # data
    data: list = field(  # noqa: RUF009 (field() returns a default_factory field)
        [], "data sources: a .jsonl/.json/.parquet/.arrow/.csv file, a dir of them (train / valid "
        "by name), a save_to_disk dir or a Hugging Face dataset id; several mix: a.parquet:0.7 "
        "b.jsonl:0.3 (YAML: a list of PATH[:WEIGHT] or {path, weight, split, config, format, "
        "columns})", raw=True)
    data_format: str = field(
        "auto", "row layout: auto = detected (ShareGPT conversations, Alpaca instruction, or the "
        "algorithm's own formats: text / prompt_completion / messages for sft, preference for "
        "dpo & co, kto (and preference) for kto, prompt (or messages) for online RL)", ["auto", "text", "prompt_completion", "messages", "sharegpt",
                                     "alpaca", "preference", "kto", "prompt"])
    data_split: str = field("train", "the split that trains (dataset dicts, Hub ids, dirs); "
                            "validation = the validation / valid / dev split")
    data_config: str = field("", "Hugging Face dataset config (subset) name")
    columns: list = field(  # noqa: RUF009 (field() returns a default_factory field)
        [], "read columns under the names a format expects: prompt=question completion=answer",
        raw=True)
    valid_fraction: float = field(
        0.0, "hold out this fraction (< 1) or number (>= 1) of the rows of each source that has "
        "no validation split, chosen by a hash of each row (the same rows on every run)")
    chat_template: str = field(
        "", "chat template: a Jinja file or a built-in name (chatml, llama3, gemma); saved with "
        "the adapters")
    data_workers: int = field(0, "processes that tokenise; 0 = one per idle core when the data is "
                              "large")
    data_cache: bool = field(True, "cache tokenised data in $POSTTRAIN_CACHE/data, keyed by data, "
                             "tokenizer and settings")
    max_length: int = field(1024, "tokens per example; longer ones are truncated (keep start)")
    packing: bool = field(False, "pack examples into rows (best-fit decreasing), documents isolated")
    train_on: str = field(
        "auto",
        "tokens that carry loss: auto = completion for prompt/completion, every assistant turn "
        "for messages, everything for text",
        ["auto", "completion", "all"],
    )
    train_after_eot: bool = field(
        False, "chat data: also train the whitespace the template writes after each end-of-turn "
        "token (TRL does; it is never generated, so by default it carries no loss)")
    skip_invalid: bool = field(False, "skip malformed examples (reported by rule) instead of failing")
    # loop
    seed: int = field(0, "seed for data order, adapter init and dropout (0 to 2**32 - 1)")
    batch_size: int = field(4, "examples (or packed rows) per micro-batch")
    grad_accumulation_steps: int = field(1, "micro-batches per optimiser step")
    steps: int = field(0, "optimiser steps; 0 = run --epochs epochs")
    epochs: int = field(1, "passes over the training data when --steps is 0")
    learning_rate: float = field(1e-4, "peak learning rate")
    lr_schedule: str = field("constant", "learning-rate schedule", ["constant", "linear", "cosine"])
    warmup_steps: int = field(0, "linear warm-up steps from 0 to the peak learning rate")
    min_lr_ratio: float = field(0.0, "final LR of linear/cosine decay as a fraction of the peak")
    weight_decay: float = field(
        0.0, "AdamW decoupled weight decay (biases and norm weights exempt, as in transformers)")
    decay_norms_and_biases: bool = field(
        False, "apply --weight-decay to biases and norm weights too (default: exempt)")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.999, "AdamW beta2")
    adam_epsilon: float = field(1e-8, "AdamW epsilon")
    max_grad_norm: float = field(1.0, "clip gradients to this global L2 norm; 0 = no clipping")
    zero_grad_patience: int = field(
        10, "stop the run when the gradient norm is exactly 0 for this many steps in a row (the "
            "weights collapsed); a NaN/inf loss or gradient always stops it; 0 = never")
    logprob_chunk_size: int = field(
        512, "tokens per chunk of the lm_head + log-softmax (the [B, T, V] logits never exist)"
    )
    kernels: str = field(
        "auto", "torch backend: Triton kernels (fused head, RMSNorm, RoPE, SwiGLU/LoRA MLP); "
        "auto = on a CUDA GPU when Triton is importable, triton = insist, torch = none "
        "(the MLX backend has no Triton and ignores it)", ["auto", "triton", "torch"],
    )
    grad_checkpoint: bool = field(
        False, "activation checkpointing per transformer block: keep only each block's input, "
        "recompute the rest in backward (less memory, one more forward pass)"
    )
    grad_checkpoint_blocks: int = field(
        0, "checkpoint only this many of the transformer blocks, spread evenly (implies "
        "--grad-checkpoint; 0 = all of them with --grad-checkpoint): each one trades its "
        "saved activations for one more forward of itself"
    )
    # several processes (torchrun / mlx.launch; README "Several processes and machines")
    parallel: str = field(
        "ddp", "across processes: ddp = every rank holds the model, gradients summed over ranks; "
        "fsdp = FSDP2 shards parameters, gradients and optimiser state over the ranks (torch; "
        "MLX is data parallel)", ["ddp", "fsdp"])
    dist_timeout: int = field(
        1800, "seconds a rank waits for the others in a collective before the job stops")
    # output and cadence
    run_dir: str = field("runs/latest", "where metrics, checkpoints and adapters are written")
    log_every: int = field(1, "write metrics every N optimiser steps")
    eval_every: int = field(0, "validation loss every N steps (and at the end); 0 = only at the end")
    eval_batches: int = field(0, "validation micro-batches per evaluation; 0 = the whole set")
    save_every: int = field(0, "checkpoint every N steps (always at the end); 0 = only at the end")
    resume: bool = field(False, "continue from the latest checkpoint in --run-dir")
    progress: bool = field(
        True, "a progress bar on a terminal; without one (or with --no-progress) one log line "
        "per --log-every steps")
    report_to: list = field(  # noqa: RUF009
        [], "also log metrics and the config to: tensorboard (<run-dir>/tensorboard) and/or "
        "wandb", ["tensorboard", "wandb"])
    wandb_project: str = field("posttrain", "W&B project (--report-to wandb)")
    wandb_mode: str = field(
        "auto", "W&B mode: online, offline (<run-dir>/wandb, upload with wandb sync), or auto = "
        "online when W&B credentials are set, else offline", ["auto", "online", "offline"])
    plots: bool = field(True, "PNG plots of the metrics in <run-dir>/plots at the end")
    sample_prompt: str = field("", "after training, generate a reply to this prompt and print it")
    sample_max_tokens: int = field(64, "tokens generated for --sample-prompt")

    def validate(self) -> None:
        """Check values that types cannot; raise ConfigError naming the flag."""
        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _bad(f.name, value, "must be a finite number")
        if self.grad_checkpoint_blocks < 0:
            _bad("grad_checkpoint_blocks", self.grad_checkpoint_blocks,
                 "must be >= 0 (0 = every block with --grad-checkpoint)")
        positive = ["lora_rank", "batch_size", "grad_accumulation_steps", "max_length",
                    "logprob_chunk_size", "log_every", "dist_timeout"]
        for name in positive:
            if getattr(self, name) <= 0:
                _bad(name, getattr(self, name), "must be > 0")
        for name in ["steps", "epochs", "warmup_steps", "eval_every", "eval_batches", "save_every",
                     "sample_max_tokens", "zero_grad_patience"]:
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if self.steps == 0 and self.epochs == 0:
            _bad("steps", 0, "--steps or --epochs must be > 0")
        for name in ["learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon"]:
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _bad("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not 0.0 <= self.lora_dropout < 1.0:
            _bad("lora_dropout", self.lora_dropout,
                 "must be in [0, 1): dropout 1 zeroes every LoRA input, so nothing trains")
        if not self.lora_alpha > 0:
            _bad("lora_alpha", self.lora_alpha,
                 "must be > 0: the update is scaled by alpha / rank, so 0 trains nothing")
        if not 0 <= self.seed < 2**32:
            _bad("seed", self.seed, "must be in [0, 2**32)")
        for name in ["adam_beta1", "adam_beta2"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(name, getattr(self, name), "must be in [0, 1)")
        if not self.data:
            _bad("data", "", "is required: a data file or directory, or a Hugging Face dataset id")
        self._validate_data()
        if self.quantize_base not in (0, 4, 8):
            _bad("quantize_base", self.quantize_base, "must be 4 or 8 (0 = off)")
        if self.quantize_group_size not in (32, 64, 128):
            _bad("quantize_group_size", self.quantize_group_size, "must be 32, 64 or 128")
        if self.quantize_base and self.fine_tune_type == "full":
            _bad("quantize_base", self.quantize_base, "trains adapters on a quantised base; "
                 "full fine-tuning needs float weights (use --fine-tune-type lora or dora)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and isinstance(value, list):
                bad = [v for v in value if v not in choices]
                if bad:
                    _bad(f.name, bad[0], f"must be among {', '.join(map(str, choices))}")
            elif choices and value not in choices:
                _bad(f.name, getattr(self, f.name), f"must be one of {', '.join(map(str, choices))}")

    @property
    def reference_model(self) -> str:
        """The ``--ref-model`` of algorithms that have one; "" = the starting model is the
        reference (what ``forward(reference=True)`` runs for every other algorithm)."""
        return ""

    @property
    def uses_value_head(self) -> bool:
        """Whether the backend builds a value head (PPO's GAE estimator needs one)."""
        return False

    def _validate_data(self) -> None:
        """--data, --columns, --valid-fraction, --chat-template, --data-workers."""
        from .data.records import DataError
        from .data.sources import parse_sources
        from .data.templates import resolve_chat_template

        try:
            parse_sources(self.data, self.data_split, self.data_config, self.data_format,
                          self.columns)
            if self.chat_template:
                resolve_chat_template(self.chat_template)
        except DataError as e:
            raise ConfigError(str(e)) from None
        if self.valid_fraction < 0 or (self.valid_fraction >= 1
                                       and not float(self.valid_fraction).is_integer()):
            _bad("valid_fraction", self.valid_fraction,
                 "must be a fraction in [0, 1) or a whole number of rows")
        if self.data_workers < 0:
            _bad("data_workers", self.data_workers, "must be >= 0 (0 = automatic)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _bad(name: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"--{name.replace('_', '-')}={value!r}: {rule}")


def config_json(cfg: TrainConfig, extra: dict | None = None) -> str:
    """The resolved config (every field, defaults included) as the text of ``config.json``."""
    payload = {"algorithm": type(cfg).__name__, **cfg.to_dict(), **(extra or {})}
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


# The flag and YAML parser lives in algorithms/flags.py; these names are the config's public API.
from .flags import build_config, load_yaml, make_parser

__all__ = ["ConfigError", "TrainConfig", "build_config", "config_json", "field", "load_yaml",
           "make_parser"]
