"""QLoRA on torch: ``--quantize-base 4|8`` loads the base through bitsandbytes (NF4 / int8).

bitsandbytes' kernels run on CUDA GPUs only, so elsewhere the flag is refused before the model
loads, with the alternatives (``mlx_ft --quantize-base`` quantises on any device). LoRA / DoRA
layers are PEFT's on top of the quantised linear layers, initialised like every other run
(:func:`cuda_ft.model.init_lora_weights`); the compute dtype is the run's (bfloat16 on a GPU).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from algorithms.model_check import ModelError


def check_options(cfg: Any) -> None:
    """A ModelError when ``--quantize-base`` cannot run here (no CUDA, no bitsandbytes, or
    combined with ``--init-adapter``, which must be merged into float weights)."""
    bits = int(getattr(cfg, "quantize_base", 0) or 0)
    if not bits:
        return
    if not torch.cuda.is_available():
        raise ModelError(f"--quantize-base {bits}: cuda_ft quantises with bitsandbytes, which "
                         "needs a CUDA GPU, and this machine has none; use python -m mlx_ft "
                         "(MLX quantises on the CPU too), or train the float model")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"--quantize-base {bits}: needs the bitsandbytes package "
                         "(pip install bitsandbytes)")
    if getattr(cfg, "init_adapter", ""):
        raise ModelError(f"--quantize-base {bits} with --init-adapter: the initial adapter is "
                         "merged into float weights before quantisation, which bitsandbytes "
                         "does at load; fuse the adapter first (python -m converters fuse)")


def load_quantized(cfg: Any, model_path: str | Path, choice: Any,
                   init_deltas: dict | None = None) -> torch.nn.Module:
    """The base quantised by bitsandbytes on ``choice.device``, with PEFT adapters attached."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .model import _attach_lora

    check_options(cfg)
    if init_deltas:
        raise ModelError("--init-adapter cannot be merged into a bitsandbytes base")
    bits = int(cfg.quantize_base)
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=choice.dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = choice.device.index if choice.device.index is not None else 0
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path), quantization_config=config, dtype=choice.dtype,
            device_map={"": device})
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{model_path}: bitsandbytes could not load it "
                         f"({' '.join(str(e).split())[:300]})") from None
    model.eval()
    print(f"cuda_ft: base quantised to {bits} bits with bitsandbytes "
          f"({'NF4' if bits == 4 else 'int8'}) at load", file=sys.stderr)
    return _attach_lora(cfg, model)
