"""Helpers of the TRL parity tier (``-m trl_parity``): the same run through TRL and through us.

A parity case is one algorithm on the tiny Llama of :mod:`tiny`, full fine-tuning, float32 on
the CPU, one batch holding the whole data set (so every step sees the same rows and the order
of rows inside a batch changes nothing but float rounding), a few steps of AdamW with a constant
learning rate, no warm-up, the same weight decay (biases and norm weights exempt, transformers'
convention) and the same gradient clipping. :func:`run_trl` drives TRL's own trainer and records
what it logs at every step; :func:`run_ours` runs ``python -m cuda_ft`` / ``python -m mlx_ft``
in-process and reads ``metrics.jsonl``; :func:`assert_same_curves` compares them key by key.

Adding a trainer is one :data:`TRL_TRAINERS` entry (where its class and config live, and how
our flags map onto its config) plus, in the test file, one :class:`Case`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

# Shared settings of every case: ours as flags, TRL's as TrainingArguments.
STEPS = 4
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
MAX_LENGTH = 64

# Our metric name -> TRL's, where they differ.
TRL_NAMES = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins",
             "loss/nll": "nll_loss"}
# Relative errors are taken against max(|TRL's value|, FLOOR) (more for rewards: see _scale).
FLOOR = 0.1

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "moon"]


def preference_rows(n: int = 8) -> list[dict]:
    """String prompt / chosen / rejected rows. Prompts end on a word and responses start with a
    space, so tokenising prompt and response apart (us) or together (TRL) gives the same ids."""
    rows = []
    for i, w in enumerate(WORDS[:n]):
        other = WORDS[(i + 3) % len(WORDS)]
        rows.append({"prompt": f"Q: say {w} twice. A:",
                     "chosen": f" {w} {w}." if i % 2 else f" {w} {w}",
                     "rejected": f" not {other}, {other} is the answer"[: 12 + 3 * i]})
    return rows


def unpaired_rows(n: int = 8) -> list[dict]:
    """KTO rows (prompt, completion, label), desirable and undesirable interleaved."""
    rows = []
    for i, pair in enumerate(preference_rows(n)):
        good = i % 3 != 1
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"],
                     "label": good})
    return rows


def sft_rows(n: int = 8) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n)]


def chat_sft_rows(n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["chosen"].strip()}]}
            for r in preference_rows(n)]


def write_rows(rows: list[dict], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


# ---------------------------------------------------------------------------------------------
# TRL


@dataclasses.dataclass(frozen=True)
class TRLTrainer:
    """Where TRL keeps an algorithm's trainer and config, and how our run maps onto it."""

    module: str
    trainer: str
    config: str
    rows_per_example: int = 1  # rows a data-set example becomes in a batch (KTO unpairs none)


TRL_TRAINERS = {
    "sft": TRLTrainer("trl", "SFTTrainer", "SFTConfig"),
    "dpo": TRLTrainer("trl", "DPOTrainer", "DPOConfig"),
    "kto": TRLTrainer("trl", "KTOTrainer", "KTOConfig"),
    "orpo": TRLTrainer("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"),
    "cpo": TRLTrainer("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
}


def trl_version() -> str:
    import trl

    return trl.__version__


def run_trl(algorithm: str, model_dir: Path, rows: list[dict], out: Path,
            config: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """Train with TRL's own trainer; every step's logged metrics (``loss``, ``grad_norm``,
    rewards...), exactly as the trainer logged them, one dict per optimiser step."""
    import importlib
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = TRL_TRAINERS[algorithm]
    module = importlib.import_module(spec.module)
    trainer_cls, config_cls = getattr(module, spec.trainer), getattr(module, spec.config)
    logging.getLogger("trl").setLevel(logging.ERROR)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = config_cls(
        output_dir=str(out), per_device_train_batch_size=len(rows), max_steps=STEPS,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        max_length=MAX_LENGTH, **(config or {}))
    logged: list[dict[str, float]] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "train_runtime" not in logs:
                logged.append({k: float(v) for k, v in logs.items()
                               if isinstance(v, (int, float))})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[Record()])
        trainer.train()
    return logged


# ---------------------------------------------------------------------------------------------
# Ours


def run_ours(backend: str, algorithm: str, model_dir: Path, data: Path, out: Path,
             batch_size: int, *flags: str) -> list[dict[str, float]]:
    """``python -m {mlx_ft,cuda_ft} ALGORITHM`` with the tier's shared settings; the train
    records of ``metrics.jsonl``, one per step."""
    from algorithms.cli import run_cli

    prog, spec = {"mlx": ("mlx_ft", "mlx_ft.backend:MLXBackend"),
                  "torch": ("cuda_ft", "cuda_ft.backend:TorchBackend")}[backend]
    argv = [algorithm, "--model", str(model_dir), "--data", str(data), "--run-dir", str(out),
            "--fine-tune-type", "full", "--dtype", "float32", "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--max-length", str(MAX_LENGTH),
            "--learning-rate", str(LEARNING_RATE), "--lr-schedule", "constant",
            "--weight-decay", str(WEIGHT_DECAY), "--max-grad-norm", str(MAX_GRAD_NORM),
            "--no-progress", *flags]
    code = run_cli(prog, spec, argv)
    assert code == 0, f"{prog} {' '.join(argv)} exited {code}"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


# ---------------------------------------------------------------------------------------------
# Online RL: one fixed generation batch, in TRL's layout and in ours

PROMPT = 5                     # prompt tokens, the same for every completion (no left padding)
LENGTHS = [7, 3, 9, 5, 9, 1]   # completion tokens, right-padded to MAX_COMPLETION
MAX_COMPLETION = 9


def fixed_batch(vocab: int, pad: int):
    """``prompt [n, PROMPT]``, ``completion [n, MAX_COMPLETION]`` ids, the completion mask and
    advantages of both signs (numpy), fixed by a seed: TRL's ``_compute_loss`` inputs."""
    rng = np.random.default_rng(7)
    n = len(LENGTHS)
    prompt = rng.integers(3, vocab, size=(n, PROMPT))
    completion = np.full((n, MAX_COMPLETION), pad)
    mask = np.zeros((n, MAX_COMPLETION), dtype=np.int64)
    for i, length in enumerate(LENGTHS):
        completion[i, :length] = rng.integers(3, vocab, size=length)
        mask[i, :length] = 1
    advantages = np.array([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=np.float32)
    return prompt, completion, mask, advantages


def online_rows(model_dir: Path, per_token: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`fixed_batch` in our layout (:mod:`algorithms.backend`): prompt + completion rows,
    targets shifted by one, the loss mask on the completion targets, ``advantages``,
    ``num_items``, and each ``[n, MAX_COMPLETION]`` array of ``per_token`` (old / reference
    log-probs...) placed at the positions that predict its tokens."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    prompt, completion, mask, advantages = fixed_batch(vocab, tok.pad_token_id)
    n, width = len(LENGTHS), PROMPT + MAX_COMPLETION
    ids = np.concatenate([prompt, completion], 1).astype(np.int32)
    targets = np.full_like(ids, tok.pad_token_id)
    targets[:, :-1] = ids[:, 1:]
    segment = np.zeros((n, width), np.int32)
    for i, length in enumerate(LENGTHS):
        segment[i, :PROMPT + length] = 1

    def place(x):
        out = np.zeros((n, width), np.float32)
        out[:, PROMPT - 1:-1] = x
        return out

    return {"input_ids": ids, "targets": targets, "loss_mask": place(mask), "segment_ids": segment,
            "advantages": advantages, "num_items": np.float32(mask.sum()),
            **{k: place(v) for k, v in per_token.items()}}


# ---------------------------------------------------------------------------------------------
# Comparison


def _scale(key: str, step: dict, beta: float) -> float:
    """What a difference in ``key`` is measured against: ``max(|TRL's value|, FLOOR)``, and for
    the quantities that are differences of two sequence log-probs (rewards, margins: beta x
    (logp - ref); KTO's kl), at least their log-probs' size (beta x |logps|): the float32
    rounding of a ~-80 log-prob is ~1e-5 in absolute terms, whatever the size of the difference."""
    scale = max(abs(step[TRL_NAMES.get(key, key)]), FLOOR)
    logps = max(abs(step.get("logps/chosen", 0.0)), abs(step.get("logps/rejected", 0.0)))
    if key.startswith("rewards/") and key != "rewards/accuracy":
        scale = max(scale, beta * logps)
    elif key == "kl":
        scale = max(scale, logps)
    return scale


def relative_errors(ours: list[dict], theirs: list[dict], keys: list[str],
                    beta: float = 0.1) -> dict[str, float]:
    """Largest ``|ours - theirs| / scale`` over the steps, per key (see :func:`_scale`)."""
    assert len(ours) == len(theirs) == STEPS, (len(ours), len(theirs))
    worst = {}
    for key in keys:
        trl_key = TRL_NAMES.get(key, key)
        errors = []
        for step, (a, b) in enumerate(zip(ours, theirs), start=1):
            assert key in a, f"step {step}: we did not log {key!r} (logged {sorted(a)})"
            assert trl_key in b, f"step {step}: TRL did not log {trl_key!r} (logged {sorted(b)})"
            errors.append(abs(a[key] - b[trl_key]) / _scale(key, b, beta))
        worst[key] = max(errors)
    return worst


def assert_same_curves(ours: list[dict], theirs: list[dict], keys: list[str], rtol: float,
                       label: str = "", beta: float = 0.1) -> dict[str, float]:
    """Every key within ``rtol`` at every step (:func:`relative_errors`); the largest errors."""
    worst = relative_errors(ours, theirs, keys, beta)
    bad = {k: v for k, v in worst.items() if not v <= rtol}
    if bad:
        table = "\n".join(f"  {k}: ours {[r[k] for r in ours]}\n"
                          f"  {' ' * len(k)}  TRL  {[r[TRL_NAMES.get(k, k)] for r in theirs]}"
                          for k in bad)
        raise AssertionError(f"{label}: relative error above {rtol:g} for {sorted(bad)}:\n{table}")
    # the loss must move, or agreeing on it proves little
    losses = [r["loss"] for r in theirs]
    assert max(losses) - min(losses) > 1e-4 * max(1.0, abs(losses[0])), losses
    assert all(math.isfinite(v) for v in np.ravel(losses))
    return worst
