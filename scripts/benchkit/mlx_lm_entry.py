"""``python -m scripts.benchkit.mlx_lm_entry METRICS [--mlx-cpu] -- <mlx_lm lora args>``.

Runs mlx-lm's own LoRA trainer through its own CLI (``mlx_lm.lora.main``, what
``python -m mlx_lm lora`` calls) with two additions and nothing else changed:

- the system OpenBLAS is loaded before MLX, as ``mlx_ft`` does, so both use the same BLAS;
- a reporting callback writes each report (the YAML sets ``steps_per_report: 1``) to METRICS as
  JSON lines, with mlx-lm's own numbers: its step time (``1 / iterations_per_second``), its token
  count (``tokens_per_second / iterations_per_second``: the real tokens of the step, prompt
  included when ``mask_prompt`` is false), MLX's peak memory; plus the process CPU time of the
  step, validation excluded.
"""

from __future__ import annotations

import json
import sys
import time


class JsonlCallback:
    def __init__(self, path: str):
        self.file = open(path, "a")  # noqa: SIM115 (lives as long as the process)
        self.cpu_mark = time.process_time()

    def on_train_loss_report(self, info: dict) -> None:
        it_per_s = float(info["iterations_per_second"])
        now = time.process_time()
        record = {"split": "train", "time": time.time(), "step": int(info["iteration"]),
                  "loss": float(info["train_loss"]), "step_time": 1.0 / it_per_s,
                  "step_tokens": float(info["tokens_per_second"]) / it_per_s,
                  "cpu_time": now - self.cpu_mark,
                  "memory/mlx_peak_gb": float(info["peak_memory"])}
        self.cpu_mark = now
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def on_val_loss_report(self, info: dict) -> None:
        self.cpu_mark = time.process_time()  # the next step's CPU time starts after validation
        self.file.write(json.dumps({"split": "valid", "step": int(info["iteration"]),
                                    "loss": float(info["val_loss"])}) + "\n")
        self.file.flush()


def main(argv: list[str]) -> None:
    metrics, rest = argv[0], argv[1:]
    cpu = "--mlx-cpu" in rest[: rest.index("--")] if "--" in rest else False
    args = rest[rest.index("--") + 1:] if "--" in rest else rest
    from mlx_ft.blas import preload_openblas

    preload_openblas()  # before MLX binds its BLAS (Linux), as python -m mlx_ft does
    import mlx.core as mx
    from mlx_lm import lora

    if cpu:
        mx.set_default_device(mx.cpu)
    callback = JsonlCallback(metrics)
    lora.get_reporting_callbacks = lambda *a, **k: callback
    sys.argv = ["mlx_lm.lora", *args]
    lora.main()


if __name__ == "__main__":
    main(sys.argv[1:])
