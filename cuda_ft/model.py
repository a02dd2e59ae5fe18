"""Load a transformers causal LM and attach the trainable part (LoRA, DoRA, or every weight).

Numbers must match the MLX backend from step 0, so the model is always built in float32 on the
CPU, adapters are created there, and each LoRA ``A`` is overwritten with
:func:`algorithms.backend.lora_a_init` (keyed by the Hugging Face module path, so the visiting
order does not matter) and ``B`` with zeros. Only then is the model moved to its device; frozen
weights are cast to the compute dtype, trainable ones stay float32 (master weights, the forward
runs under autocast when the compute dtype is lower).

Canonical parameter names, shared with ``mlx_ft`` (checkpoints and parity tests use them):
LoRA ``{module_path}.lora_A`` ``[r, in]`` and ``{module_path}.lora_B`` ``[out, r]``, DoRA adds
``{module_path}.magnitude`` ``[out]``; full fine-tuning uses the HF state-dict keys. PEFT's own
names (``base_model.model.{module_path}.lora_A.default.weight``, and
``...lora_magnitude_vector.default.weight`` for the DoRA magnitude) never leave this module.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.backend import checkpointed_blocks, lora_a_init
from algorithms.model_check import ModelError, is_mlx_quantized

from .device import DeviceChoice

_PEFT_PREFIX = "base_model.model."
_PEFT_PARAM = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)"
    r"\.default\.weight$"
)
_CANONICAL_SUFFIX = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "magnitude"}


def decoder_blocks(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted path, ModuleList)`` of the transformer blocks (``model.layers`` for Llama/Qwen)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}: cannot find the decoder blocks (get_decoder().layers); "
            "name the modules to adapt with --target-modules"
        )
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise ValueError(f"{type(model).__name__}: decoder blocks are not a submodule of the model")


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every ``nn.Linear`` inside the decoder blocks (never lm_head/embeddings)."""
    _, layers = decoder_blocks(model)
    names = {name.rsplit(".", 1)[-1] for name, module in layers.named_modules()
             if isinstance(module, nn.Linear)}
    if not names:
        raise ValueError("no nn.Linear found in the decoder blocks; set --target-modules")
    return sorted(names)


def check_model(path: Path, config: dict) -> None:
    """A ModelError for a dir transformers cannot build as a causal LM, or an MLX-quantised one."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    quantized = is_mlx_quantized(config)
    if quantized:
        raise ModelError(
            f"{path}: an MLX-quantised model ({quantized['bits']}-bit, group size "
            f"{quantized['group_size']}), which PyTorch cannot load: train it with mlx_ft "
            f"(QLoRA), or dequantise it first: python -m converters mlx-to-hf {path} OUT_DIR")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not an "
                         "architecture transformers knows")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not a "
                         "causal language model (no AutoModelForCausalLM class)")


def check_options(cfg: Any) -> None:
    """Options this backend cannot honour here, refused before the model loads."""
    from .quantized import check_options as check_quantized

    check_quantized(cfg)
    if getattr(cfg, "parallel", "ddp") == "fsdp" and getattr(cfg, "quantize_base", 0):
        raise ModelError(f"--parallel fsdp with --quantize-base {cfg.quantize_base}: FSDP2 does "
                         "not shard bitsandbytes weights; use --parallel ddp (each rank holds "
                         "the quantised base) or a float base")


def _from_pretrained(model_path: str | Path) -> nn.Module:
    """The model in float32; a ModelError for missing or misshapen tensors (transformers would
    initialise them randomly, or raise pointing at a table it logged)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{model_path}: transformers cannot load it "
                         f"({' '.join(str(e).split())[:400]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, *shapes = mismatched[0]
        detail = f" (checkpoint {tuple(shapes[0])}, config {tuple(shapes[1])})" \
            if len(shapes) == 2 else ""
        raise ModelError(f"{model_path}: tensor {key} has the wrong shape{detail}; the weights "
                         f"do not fit config.json ({len(mismatched)} tensor(s) differ)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{model_path}: the weights lack {len(missing)} tensor(s) the model "
                         f"needs, e.g. {missing[0]}; refusing to train them from a random "
                         "initialisation")
    return model


def load_model(cfg: Any, model_path: str | Path, choice: DeviceChoice,
               init_deltas: dict | None = None) -> nn.Module:
    """The HF model (full) or PEFT model (lora/dora) for ``cfg``, on ``choice.device``.

    Base dropout is off (eval mode) and stays off; only adapter dropout follows train mode
    (:func:`set_adapter_training`). MLX models have no dropout, so this keeps parity.
    ``init_deltas`` (``--init-adapter``, ``{module: (A, s B)}``) are merged into the float32
    base weights before the new adapter is attached, so the reference (adapters disabled) is
    base + initial adapter with no second copy.
    """
    from .kernel_patch import check

    check(cfg.kernels, choice.device)  # before the weights load
    if getattr(cfg, "quantize_base", 0):
        from .quantized import load_quantized

        return load_quantized(cfg, model_path, choice, init_deltas)
    model = _from_pretrained(model_path)
    model.to("cpu").eval()
    merge_deltas(model, init_deltas or {})
    if cfg.fine_tune_type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif cfg.fine_tune_type in ("lora", "dora"):
        model = _attach_lora(cfg, model)
    else:
        raise ValueError(f"--fine-tune-type={cfg.fine_tune_type!r}: must be lora, dora or full")
    model.to(choice.device)
    if choice.dtype != torch.float32:
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(choice.dtype)
    # --- kernels and activation checkpointing (cuda_ft/kernel_patch.py, grad_checkpoint.py) ---
    from . import grad_checkpoint, kernel_patch

    hf_model = model if cfg.fine_tune_type == "full" else model.get_base_model()
    plan = kernel_patch.apply(hf_model, getattr(cfg, "kernels", "auto"), choice.device)
    model.posttrain_kernels = plan
    num_blocks = len(decoder_blocks(hf_model)[1])
    try:
        blocks = checkpointed_blocks(cfg, num_blocks)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if blocks:
        print(f"cuda_ft: grad-checkpoint: {grad_checkpoint.enable(hf_model, blocks)} of "
              f"{num_blocks} blocks keep only their input and are recomputed in backward",
              file=sys.stderr, flush=True)
    # --- end kernels ---
    return model


@torch.no_grad()
def merge_deltas(model: nn.Module, deltas: dict) -> None:
    """``W += (s B) A`` in float32 for every ``{module path: (A [r, in], s B [out, r])}``."""
    for path, (a, b) in deltas.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ModelError(f"--init-adapter: the model has no module {path}") from None
        delta = torch.from_numpy(b) @ torch.from_numpy(a)
        layer.weight.add_(delta.to(layer.weight.dtype))


def _attach_lora(cfg: Any, model: nn.Module) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA/DoRA adapters initialised like the MLX backend."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules) or default_target_modules(model)
    _check_targets(model, list(cfg.target_modules))
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.fine_tune_type == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    init_lora_weights(peft_model, cfg.seed)
    peft_model.eval()
    return peft_model


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every ``--target-modules`` name must match a linear layer of the blocks (PEFT would adapt
    the ones that match and drop the others silently, or fail with its own message)."""
    _, layers = decoder_blocks(model)
    found = sorted({name.split(".", 1)[1] for name, module in layers.named_modules()
                    if isinstance(module, nn.Linear) and "." in name})
    missing = [t for t in targets
               if not any(k == t or k.rsplit(".", 1)[-1] == t for k in found)]
    if missing:
        raise ModelError(f"--target-modules {' '.join(missing)}: no such linear layer in the "
                         f"model's blocks; available: {', '.join(found)}")


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by HF module path (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            found[name.removeprefix(_PEFT_PREFIX)] = module
    return found


@torch.no_grad()
def init_lora_weights(peft_model: nn.Module, seed: int) -> None:
    """A = lora_a_init(seed, module_path, in, r), B = 0 for every adapted module.

    PEFT computed the DoRA magnitude at creation as ``||W + s * B A||`` per output row; B is
    zero, so it equals ``||W||`` whatever A is, and stays valid after A is overwritten.
    """
    layers = lora_layers(peft_model)
    if not layers:
        raise ValueError("PEFT created no LoRA layers: --target-modules matched nothing")
    for path, layer in layers.items():
        a = layer.lora_A["default"].weight
        rank, in_features = a.shape
        a.copy_(torch.from_numpy(lora_a_init(seed, path, in_features, rank)))
        layer.lora_B["default"].weight.zero_()


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters under their canonical (backend-independent) names."""
    params: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(_PEFT_PREFIX):
            match = _PEFT_PARAM.match(name)
            if match is None:
                raise ValueError(f"trainable PEFT parameter with no canonical name: {name}")
            name = f"{match['path']}.{_CANONICAL_SUFFIX[match['kind']]}"
        params[name] = param
    return params


def set_adapter_training(model: nn.Module, training: bool) -> None:
    """Train mode for adapter layers (their dropout) only; the base model stays in eval mode."""
    model.eval()
    if training:
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.train(True)
