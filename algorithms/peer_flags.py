"""Flags (and YAML keys) of the tools people come from, mapped to ours.

A user of mlx-lm (``mlx_lm.lora``), TRL or transformers' Trainer types the names they know;
difflib's nearest name is often wrong for them (``--iters`` is not ``--lr-schedule``), so an
unknown flag found here is answered with the equivalent instead. Each entry is
``(our field or None, advice)``; the advice is shown only when this algorithm has the field (a
flag of the online methods is not suggested to SFT).
"""

from __future__ import annotations

PEER_FLAGS: dict[str, tuple[str | None, str]] = {
    # mlx-lm (mlx_lm.lora)
    "iters": ("steps", "--steps N (optimiser steps)"),
    "mask_prompt": ("train_on", ("--train-on completion (the default, auto, already trains only "
                                "the completion / assistant turns)")),
    "num_layers": ("target_modules", ("every block is adapted; choose the layers' modules with "
                                     "--target-modules q_proj v_proj ...")),
    "lora_layers": ("target_modules", ("every block is adapted; choose the layers' modules with "
                                      "--target-modules q_proj v_proj ...")),
    "adapter_path": ("run_dir", ("--run-dir DIR (adapters are written to DIR/adapters); to start "
                                "from an existing adapter: --init-adapter DIR")),
    "resume_adapter_file": ("init_adapter", "--init-adapter DIR (an mlx-lm or PEFT adapter dir)"),
    "train": ("steps", "training is what this command does; no flag needed"),
    "test": ("data", ("evaluate with the evaluate verb: python -m mlx_ft evaluate <algorithm> "
                     "--data DIR --adapter DIR")),
    "val_batches": ("eval_batches", "--eval-batches N"),
    "test_batches": ("eval_batches", "the evaluate verb's --eval-batches N"),
    "steps_per_eval": ("eval_every", "--eval-every N"),
    "steps_per_report": ("log_every", "--log-every N"),
    "max_seq_length": ("max_length", "--max-length N"),
    "use_dora": ("fine_tune_type", "--fine-tune-type dora"),
    "load_in_4bits": ("quantize_base", "--quantize-base 4"),
    "load_in_8bits": ("quantize_base", "--quantize-base 8"),
    # TRL / transformers Trainer
    "bf16": ("dtype", "--dtype bfloat16"),
    "fp16": ("dtype", "--dtype float16"),
    "tf32": ("dtype", "--dtype float32"),
    "load_in_4bit": ("quantize_base", "--quantize-base 4"),
    "load_in_8bit": ("quantize_base", "--quantize-base 8"),
    "max_steps": ("steps", "--steps N"),
    "num_train_epochs": ("epochs", "--epochs N"),
    "per_device_train_batch_size": ("batch_size", "--batch-size N"),
    "per_device_eval_batch_size": ("batch_size", "--batch-size N (used for evaluation too)"),
    "gradient_accumulation_steps": ("grad_accumulation_steps", "--grad-accumulation-steps N"),
    "gradient_checkpointing": ("grad_checkpoint", "--grad-checkpoint"),
    "output_dir": ("run_dir", "--run-dir DIR"),
    "model_name_or_path": ("model", "--model PATH"),
    "dataset_name": ("data", "--data FILE_OR_DIR (local JSONL)"),
    "lr_scheduler_type": ("lr_schedule", "--lr-schedule constant|linear|cosine"),
    "warmup_ratio": ("warmup_steps", "--warmup-steps N (a count of steps)"),
    "logging_steps": ("log_every", "--log-every N"),
    "eval_steps": ("eval_every", "--eval-every N"),
    "save_steps": ("save_every", "--save-every N"),
    "resume_from_checkpoint": ("resume", "--resume (continues from --run-dir's latest checkpoint)"),
    "lora_r": ("lora_rank", "--lora-rank N"),
    "r": ("lora_rank", "--lora-rank N"),
    "lora_target_modules": ("target_modules", "--target-modules q_proj v_proj ..."),
    "max_prompt_length": ("max_length", "--max-length N covers prompt + completion"),
    "max_new_tokens": ("max_completion_length", "--max-completion-length N"),
    "optim": ("learning_rate", ("AdamW is the optimiser; tune --learning-rate, --adam-beta1/2, "
                               "--weight-decay")),
    "use_peft": ("fine_tune_type", "LoRA is the default (--fine-tune-type lora|dora|full)"),
    "use_vllm": ("rollout_batch_size", ("rollouts use the backend's own batched sampler "
                                       "(--rollout-batch-size sets how many at once)")),
    "report_to_wandb": ("report_to", "--report-to wandb"),
    # several processes (transformers / accelerate / mlx-lm)
    "fsdp": ("parallel", "--parallel fsdp, started with torchrun --nproc-per-node N -m cuda_ft"),
    "fsdp_config": ("parallel", "--parallel fsdp (FSDP2, every decoder block a unit)"),
    "ddp_timeout": ("dist_timeout", "--dist-timeout SECONDS"),
    "ddp_backend": ("parallel", ("the engine follows the devices (NCCL on GPUs, gloo on CPUs); "
                                "--parallel ddp|fsdp")),
    "deepspeed": ("parallel", "--parallel fsdp shards parameters, gradients and optimiser state"),
}


def peer_hint(name: str, fields: set[str]) -> str | None:
    """The advice for a peer tool's option ``name`` (underscored, no dashes), or None when it is
    not one we know or its equivalent does not exist in this algorithm (``fields``)."""
    entry = PEER_FLAGS.get(name.lstrip("-").replace("-", "_"))
    if entry is None:
        return None
    target, advice = entry
    if target is not None and target not in fields:
        return None
    return advice
