"""``python -m scripts.benchkit.trl_entry SPEC.json``: the recipe through TRL's ``SFTTrainer``,
``DPOTrainer`` or ``GRPOTrainer`` with a PEFT ``LoraConfig``, written as a user would write it
(TRL's defaults unless the recipe says otherwise; the trainers are built in
:mod:`scripts.benchkit.trl_trainers`), plus measurement:

- a ``TrainerCallback`` times each optimiser step (``on_step_begin`` -> ``on_step_end``) and its
  process CPU time, and the optimiser alone (``on_pre_optimizer_step`` -> ``on_optimizer_step``);
- ``training_step`` is wrapped to count the step's real tokens (``attention_mask.sum()``; for
  GRPO, prompt + completion masks) and to time forward (``compute_loss``) and backward;
- DPO and GRPO: the reference pass (TRL runs it inside ``use_adapter``: LoRA disabled) is timed
  by wrapping that context manager; GRPO's generation and scoring by wrapping
  ``_generate`` and ``_calculate_rewards``;
- the settings TRL actually used are dumped from the trainer's ``args`` and ``peft_config``.

Writes ``metrics.jsonl`` and ``settings.json`` into SPEC's ``out`` dir.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Clock:
    """Seconds per named phase of the current optimiser step."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.phases: dict[str, float] = {}
        self.tokens = 0

    def reset(self) -> None:
        self.phases, self.tokens = {}, 0

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        """``fn`` wrapped so that its calls add to phase ``name``."""

        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.add(name, time.perf_counter() - start)

        return wrapper

    def timed_context(self, name: str, factory):
        """A context-manager factory whose ``with`` bodies add to phase ``name``."""
        import contextlib

        @contextlib.contextmanager
        def wrapper(*args, **kwargs):
            with factory(*args, **kwargs) as value:
                self.sync()
                start = time.perf_counter()
                try:
                    yield value
                finally:
                    self.sync()
                    self.add(name, time.perf_counter() - start)

        return wrapper


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import TrainerCallback

    from scripts.benchkit import trl_trainers

    out = Path(spec["out"])
    cuda = spec["device"] == "gpu"
    clock = Clock(torch.cuda.synchronize if cuda else (lambda: None))
    metrics = (out / "metrics.jsonl").open("a")
    state: dict = {"t0": 0.0, "c0": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            clock.sync()
            clock.reset()
            state.update(t0=time.perf_counter(), c0=time.process_time())

        def on_pre_optimizer_step(self, args, st, control, **kw):
            clock.sync()
            state["o0"] = time.perf_counter()

        def on_optimizer_step(self, args, st, control, **kw):
            clock.sync()
            clock.add("optimizer", time.perf_counter() - state.pop("o0", time.perf_counter()))

        def on_step_end(self, args, st, control, **kw):
            clock.sync()
            record = {"split": "train", "step": st.global_step,
                      "step_time": time.perf_counter() - state["t0"],
                      "cpu_time": time.process_time() - state["c0"],
                      "step_tokens": clock.tokens}
            record.update(trl_trainers.time_split(spec["algorithm"], clock.phases))
            if cuda:
                record["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            state["record"] = record

        def on_log(self, args, st, control, logs=None, **kw):
            record = state.pop("record", None)
            if record is not None and logs and "loss" in logs:
                record.update(loss=float(logs["loss"]), time=time.time())
                if "completions/mean_length" in logs:  # GRPO
                    record["completions/mean_length"] = float(logs["completions/mean_length"])
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()

    trainer = trl_trainers.build(spec, clock, [Timer()])
    lora = trainer.model.peft_config["default"]
    settings = {
        "model": spec["model"], "data": spec["data"], "algorithm": spec["algorithm"],
        "fine_tune_type": "lora", "lora_rank": lora.r, "lora_alpha": float(lora.lora_alpha),
        "target_modules": sorted(lora.target_modules),
        "steps": trainer.args.max_steps, "learning_rate": trainer.args.learning_rate,
        "dtype": spec["dtype"], "trl": __import__("trl").__version__,
        "peft": __import__("peft").__version__,
        **trl_trainers.settings(spec["algorithm"], trainer)}
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
