"""The TRL trainer of each benchmarked algorithm, configured from a bench spec, and what it
recorded (read back for the matched-settings check) and measured (the time split).

- ``sft``: ``SFTTrainer``, loss on every token, no packing.
- ``dpo``: ``DPOTrainer``, sigmoid loss, reference = the base model with LoRA disabled, computed
  on the fly (TRL's default, as ours without ``--precompute-ref``).
- ``grpo``: ``GRPOTrainer`` with
  ``prompts_per_step x num_generations`` completions per optimiser step, ``batch_size`` of them
  per forward (``gradient_accumulation_steps`` micro-batches of one generation batch), our
  defaults where TRL's differ (``loss_type`` grpo, ``use_bias_correction_kl`` off), the reward
  function given by name from :mod:`rewards` (its signature is TRL's).

Every trainer: constant learning rate, no warm-up, no weight decay, no gradient clipping, AdamW
(torch), one process, no dataloader workers, LoRA dropout 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ONLINE = ("grpo",)


def common_args(spec: dict) -> dict[str, Any]:
    cuda = spec["device"] == "gpu"
    out = Path(spec["out"])
    return {
        "output_dir": str(out / "trainer"), "max_steps": spec["steps"],
        "learning_rate": spec["learning_rate"], "lr_scheduler_type": "constant", "warmup_steps": 0,
        "weight_decay": 0.0, "max_grad_norm": 0.0, "optim": "adamw_torch", "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": spec["seed"], "data_seed": spec["seed"],
        "use_cpu": not cuda, "bf16": cuda and spec["dtype"] == "bfloat16",
        "fp16": cuda and spec["dtype"] == "float16", "dataloader_num_workers": 0,
        "disable_tqdm": True}


def build(spec: dict, clock: Any, callbacks: list) -> Any:
    """The trainer for ``spec["algorithm"]``, its steps timed into ``clock``."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    algorithm = spec["algorithm"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(Path(spec["data"]) / "train.jsonl"),
                           split="train")
    peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
                             lora_dropout=0.0, target_modules=spec["target_modules"],
                             task_type="CAUSAL_LM")
    kwargs: dict[str, Any] = {"model": model, "train_dataset": dataset,
                              "processing_class": tokenizer, "peft_config": peft_config,
                              "callbacks": callbacks}
    if algorithm == "sft":
        from trl import SFTConfig, SFTTrainer

        base, args = SFTTrainer, SFTConfig(
            **common_args(spec), per_device_train_batch_size=spec["batch_size"],
            max_length=spec["max_length"], assistant_only_loss=False, packing=False,
            use_liger_kernel=bool(spec.get("liger")))
    elif algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer
        from trl.trainer import dpo_trainer

        dpo_trainer.use_adapter = clock.timed_context("reference", dpo_trainer.use_adapter)
        base, args = DPOTrainer, DPOConfig(
            **common_args(spec), per_device_train_batch_size=spec["batch_size"],
            max_length=spec["max_length"], beta=spec["beta"], loss_type=["sigmoid"],
            precompute_ref_log_probs=False, use_liger_kernel=bool(spec.get("liger")))
    elif algorithm in ONLINE:
        from trl import GRPOConfig, GRPOTrainer
        from trl.trainer import grpo_trainer

        from rewards.registry import load_reward

        grpo_trainer.use_adapter = clock.timed_context("reference", grpo_trainer.use_adapter)
        completions = spec["prompts_per_step"] * spec["num_generations"]
        base, args = GRPOTrainer, GRPOConfig(
            **common_args(spec), per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=completions // spec["batch_size"],
            num_generations=spec["num_generations"],
            max_completion_length=spec["max_completion_length"],
            temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"],
            loss_type="grpo", epsilon=0.2,
            scale_rewards="group", use_bias_correction_kl=False, num_iterations=1,
            mask_truncated_completions=False, log_completions=False,
            use_liger_kernel=bool(spec.get("liger")))
        kwargs["reward_funcs"] = [named_reward(spec["reward"], load_reward(spec["reward"]))]
    else:
        raise ValueError(f"--compare trl: no TRL trainer for {algorithm!r}")
    trainer_class = timed_trainer(base, clock, online=algorithm in ONLINE)
    return trainer_class(args=args, **kwargs)


def named_reward(spec: str, fn: Any) -> Any:
    """``fn`` called as TRL calls reward functions, named ``spec`` (TRL logs by ``__name__``)."""

    def reward(prompts, completions, **kwargs):
        return fn(prompts, completions, **kwargs)

    reward.__name__ = spec
    return reward


def timed_trainer(base: type, clock: Any, online: bool) -> type:
    """``base`` with its step phases timed into ``clock`` and its real tokens counted."""

    class Timed(base):
        def training_step(self, *args, **kwargs):
            return clock.timed("train_step", super().training_step)(*args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            if "completion_mask" in inputs and "prompt_mask" in inputs:  # GRPO
                clock.tokens += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            elif inputs.get("attention_mask") is not None:
                clock.tokens += int(inputs["attention_mask"].sum())
            else:
                clock.tokens += inputs["input_ids"].numel()
            return clock.timed("forward", super().compute_loss)(model, inputs, *args, **kwargs)

    if online:
        class TimedOnline(Timed):
            def _prepare_inputs(self, *args, **kwargs):
                return clock.timed("prepare", super()._prepare_inputs)(*args, **kwargs)

            def _generate(self, *args, **kwargs):
                return clock.timed("generation", super()._generate)(*args, **kwargs)

            def _calculate_rewards(self, *args, **kwargs):
                return clock.timed("scoring", super()._calculate_rewards)(*args, **kwargs)

        return TimedOnline
    return Timed


def time_split(algorithm: str, phases: dict[str, float]) -> dict[str, float]:
    """The step's phases in the vocabulary of our metrics (``time/...`` seconds).

    Offline: ``reference`` (the no-grad reference pass), ``forward`` (the policy's, without the
    reference), ``backward``, ``optimizer``. Online: ``generation``, ``scoring``, ``logps`` (the
    no-grad passes after sampling), ``update`` (forward, backward and optimiser of every
    micro-batch).
    """
    get = phases.get
    if algorithm in ONLINE:
        out = {"time/generation": get("generation", 0.0), "time/scoring": get("scoring", 0.0),
               "time/logps": get("reference", 0.0),
               "time/update": get("train_step", 0.0) - get("prepare", 0.0)
               + get("optimizer", 0.0)}
    else:
        ref = get("reference", 0.0)
        out = {"time/forward": get("forward", 0.0) - ref,
               "time/backward": get("train_step", 0.0) - get("forward", 0.0),
               "time/optimizer": get("optimizer", 0.0)}
        if ref:
            out["time/reference"] = ref
    return {k: round(max(v, 0.0), 6) for k, v in out.items()}


def settings(algorithm: str, trainer: Any) -> dict[str, Any]:
    """What the trainer will actually do, in the bench's vocabulary."""
    a = trainer.args
    out: dict[str, Any] = {"max_length": getattr(a, "max_length", None)}
    if algorithm in ONLINE:
        generation = a.generation_batch_size or \
            a.per_device_train_batch_size * a.steps_per_generation
        out.update(batch_size=a.per_device_train_batch_size,
                   prompts_per_step=generation // a.num_generations,
                   num_generations=a.num_generations,
                   max_completion_length=a.max_completion_length,
                   temperature=float(a.temperature), top_p=float(a.top_p),
                   top_k=int(a.top_k or 0), beta=float(a.beta), loss_type=a.loss_type,
                   epsilon=float(a.epsilon), scale_rewards=str(a.scale_rewards),
                   use_bias_correction_kl=bool(a.use_bias_correction_kl),
                   num_iterations=a.num_iterations,
                   reward=",".join(f.__name__ for f in trainer.reward_funcs),
                   steps_per_generation=a.steps_per_generation,
                   gradient_accumulation_steps=a.gradient_accumulation_steps)
        return out
    out["batch_size"] = a.per_device_train_batch_size * a.gradient_accumulation_steps
    if algorithm == "dpo":
        types = a.loss_type
        out.update(beta=float(a.beta), loss_type=",".join([types] if isinstance(types, str)
                                                            else types))
    return out
