"""``python -m scripts.benchkit.trl_entry SPEC.json``: the recipe through TRL's ``SFTTrainer`` with
a PEFT ``LoraConfig``, written as a user would write it (TRL's defaults unless the recipe says
otherwise), plus measurement:

- a ``TrainerCallback`` times each optimiser step (``on_step_begin`` -> ``on_step_end``: forward,
  backward and AdamW; data loading happens before ``on_step_begin``) and its process CPU time;
- ``training_step`` is wrapped to count the step's real tokens (``attention_mask.sum()``);
- the settings TRL actually used are dumped from the trainer's ``args`` and ``peft_config``.

Writes ``metrics.jsonl`` and ``settings.json`` into SPEC's ``out`` dir.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    out = Path(spec["out"])
    cuda = spec["device"] == "gpu"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(Path(spec["data"]) / "train.jsonl"),
                           split="train")
    args = SFTConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=spec["batch_size"],
        max_length=spec["max_length"], max_steps=spec["steps"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", seed=spec["seed"], data_seed=spec["seed"],
        use_cpu=not cuda, bf16=cuda and spec["dtype"] == "bfloat16",
        fp16=cuda and spec["dtype"] == "float16", dataloader_num_workers=0,
        assistant_only_loss=False, packing=False, disable_tqdm=True,
        use_liger_kernel=bool(spec.get("liger")),
    )
    peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
                             lora_dropout=0.0, target_modules=spec["target_modules"],
                             task_type="CAUSAL_LM")
    metrics = (out / "metrics.jsonl").open("a")
    state = {"tokens": 0, "t0": 0.0, "c0": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            state.update(tokens=0, t0=time.perf_counter(), c0=time.process_time())

        def on_step_end(self, args, st, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            state["record"] = {"split": "train", "step": st.global_step,
                               "step_time": time.perf_counter() - state["t0"],
                               "cpu_time": time.process_time() - state["c0"],
                               "step_tokens": state["tokens"]}
            if cuda:
                state["record"]["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9

        def on_log(self, args, st, control, logs=None, **kw):
            record = state.pop("record", None)
            if record is not None and logs and "loss" in logs:
                record.update(loss=float(logs["loss"]), time=time.time())
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()

    class Trainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            state["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Timer()])
    lora = trainer.model.peft_config["default"]
    (out / "settings.json").write_text(json.dumps({
        "model": spec["model"], "data": spec["data"],
        "fine_tune_type": "lora", "lora_rank": lora.r, "lora_alpha": float(lora.lora_alpha),
        "target_modules": sorted(lora.target_modules),
        "batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps,
        "max_length": trainer.args.max_length, "steps": trainer.args.max_steps,
        "learning_rate": trainer.args.learning_rate,
        "dtype": spec["dtype"], "trl": __import__("trl").__version__,
        "peft": __import__("peft").__version__}, indent=2) + "\n")
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
