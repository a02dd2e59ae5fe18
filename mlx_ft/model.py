"""Load an HF model dir through mlx-lm and attach LoRA / DoRA adapters (or unfreeze everything).

Adapter layers are mlx-lm's own ``LoRALinear`` / ``DoRALinear`` (so ``mlx_lm.load(...,
adapter_path=...)`` rebuilds exactly what we trained), with ``lora_a`` re-initialised from
``algorithms.backend.lora_a_init`` so MLX and torch start from identical adapters. mlx-lm stores
``lora_a`` as ``[in, r]`` and ``lora_b`` as ``[r, out]`` (``y = Wx + scale * (x A) B``); PEFT's
layout is the transpose, and ``canonical_name`` / ``to_canonical`` map between them. The LoRA
layers are re-classed to :class:`RankScaledLoRA` (same parameters, same saved adapter), which
applies ``scale`` to the ``[N, r]`` product instead of the ``[N, out]`` one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from algorithms.backend import checkpointed_blocks, lora_a_init
from algorithms.model_check import ModelError

LORA_LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B", "m": "magnitude"}


def check_model(path: Path, config: dict) -> None:
    """A ModelError when mlx-lm has no model class for ``config`` (the architecture)."""
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except (ValueError, ImportError, KeyError) as e:
        raise ModelError(f"{Path(path) / 'config.json'}: model_type {config.get('model_type')!r} "
                         f"is not an architecture mlx-lm can build ({e})") from None


def check_options(cfg: Any) -> None:
    """Options this backend cannot honour, refused before the model loads."""
    if getattr(cfg, "parallel", "ddp") == "fsdp":
        raise ModelError("--parallel fsdp: FSDP2 is the torch backend's (torchrun -m cuda_ft); "
                         "mlx_ft trains data parallel across processes (--parallel ddp)")


def load_model(path: Path, dtype: Any) -> tuple[nn.Module, dict]:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from converters.keymaps import flat_rope

    # transformers 5 saves rope settings only under "rope_parameters", which several mlx-lm
    # families do not read (they would silently use rope_theta 10000): pass the flat keys.
    saved = json.loads((Path(path) / "config.json").read_text())
    overrides = {k: v for k, v in flat_rope(saved).items() if saved.get(k) is None}
    try:
        model, config = mlx_lm_load_model(Path(path), model_config=overrides)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # shapes, missing tensors...
        raise ModelError(f"{path}: the weights do not fit the config ({' '.join(str(e).split())})"
                         ) from None
    if dtype is not None:
        # Cast floating weights only; quantised weights (uint32) and their scales stay as stored.
        model.update(_cast_floats(model.parameters(), dtype))
    return model, config


def _cast_floats(tree: Any, dtype: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast_floats(v, dtype) for v in tree]
    if isinstance(tree, mx.array) and mx.issubdtype(tree.dtype, mx.floating):
        return tree.astype(dtype)
    return tree


def quantize_base(model: nn.Module, config: dict, cfg: Any) -> None:
    """``--quantize-base BITS``: quantise the float base at load (affine, ``--quantize-group-size``,
    embeddings included as mlx-lm does), so QLoRA needs no conversion step. Layers whose input
    width is not a multiple of the group size stay float. A start-up line says when quantised
    matmuls are the slow path (the Linux CPU has no optimised kernels for them)."""
    import sys

    bits = int(getattr(cfg, "quantize_base", 0) or 0)
    quantized = bits or config.get("quantization")
    if bits:
        if config.get("quantization"):
            q = config["quantization"]
            raise ModelError(f"--quantize-base {bits}: the model is already quantised "
                             f"({q.get('bits')}-bit, group size {q.get('group_size')}); drop "
                             "the flag (its adapters train as QLoRA as it is)")
        group = int(cfg.quantize_group_size)
        nn.quantize(model, group_size=group, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group == 0)
        print(f"mlx_ft: base quantised to {bits} bits (group size {group}) at load",
              file=sys.stderr)
    if quantized and sys.platform.startswith("linux") \
            and mx.default_device().type == mx.DeviceType.cpu:
        print("mlx_ft: note: quantised matmuls on the Linux CPU have no optimised kernels: "
              "expect steps several times (up to ~10x) slower than float; quantisation saves "
              "memory here, not time", file=sys.stderr)


def block_linear_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Block-relative paths (e.g. ``self_attn.q_proj``) of the linear layers to adapt.

    ``targets`` are leaf names (``q_proj``) or block-relative paths; empty means every linear
    layer inside the blocks. A target that matches nothing is an error naming what exists.
    """
    found = sorted({name for name, m in model.layers[0].named_modules()
                    if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
    if not targets:
        return found
    keys = [k for k in found if k in targets or k.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if not any(k == t or k.rsplit(".", 1)[-1] == t for k in found)]
    if missing:
        raise ModelError(f"--target-modules {' '.join(missing)}: no such linear layer in the "
                         f"model's blocks; available: {', '.join(found)}")
    return keys


def attach_adapters(model: nn.Module, cfg: Any) -> dict:
    """Freeze the base and add adapters per ``cfg``; return mlx-lm's adapter_config dict."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = len(model.layers)
    try:  # --grad-checkpoint[-blocks] (mlx_ft/grad_checkpoint.py)
        blocks = checkpointed_blocks(cfg, num_layers)
    except ValueError as e:
        raise ModelError(str(e)) from None
    if blocks:
        import sys

        from .grad_checkpoint import enable

        print(f"mlx_ft: grad-checkpoint: {enable(model, blocks)} of {num_layers} blocks keep "
              "only their input and are recomputed in backward", file=sys.stderr, flush=True)
    if cfg.fine_tune_type == "full":
        model.unfreeze()
        return {"fine_tune_type": "full", "num_layers": num_layers}
    keys = block_linear_keys(model, list(cfg.target_modules))
    lora_parameters = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank,
                       "dropout": cfg.lora_dropout, "keys": keys}
    model.freeze()
    linear_to_lora_layers(model, num_layers, dict(lora_parameters),
                          use_dora=cfg.fine_tune_type == "dora")
    _init_lora(model, cfg.seed, cfg.lora_rank)
    _scale_rank(model)
    return {"fine_tune_type": cfg.fine_tune_type, "num_layers": num_layers,
            "lora_parameters": lora_parameters}


def _init_lora(model: nn.Module, seed: int, rank: int) -> None:
    updates = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_a"):
            in_features = module.lora_a.shape[0]
            a = lora_a_init(seed, name, in_features, rank)
            updates.append((f"{name}.lora_a", mx.array(a.T)))
            updates.append((f"{name}.lora_b", mx.zeros_like(module.lora_b)))
    model.load_weights(updates, strict=False)


class RankScaledLoRA(LoRALinear):
    """mlx-lm's ``LoRALinear`` computing ``W x + ((x A) * scale) B``: the scale multiplies the
    ``[N, r]`` product, not the ``[N, out]`` one (one pass over ``[N, out]`` fewer in the forward
    and in the backward: ~2.5% of an SFT step on SmolLM2 with every linear adapted). The same
    function up to float rounding (exactly the same when ``scale`` is a power of two)."""

    def __call__(self, x):
        z = (self.dropout(x) @ self.lora_a) * self.scale
        return self.linear(x) + (z @ self.lora_b).astype(x.dtype)


def _scale_rank(model: nn.Module) -> None:
    """Re-class mlx-lm's ``LoRALinear`` layers of ``model`` in place (not ``DoRALinear``)."""
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = RankScaledLoRA


class FrozenDelta(nn.Module):
    """A linear layer plus a frozen low-rank delta: ``y = linear(x) + (x A^T) B^T`` with
    ``B`` already scaled (``--init-adapter``, see algorithms.adapter_io). Wraps a plain or
    quantised layer; sits under the trainable adapter, so the reference (adapters disabled)
    keeps it."""

    def __init__(self, linear: nn.Module, a: np.ndarray, b: np.ndarray, dtype: Any):
        super().__init__()
        self.linear = linear
        self.delta_a = mx.array(np.ascontiguousarray(a.T)).astype(dtype)  # [in, r]
        self.delta_b = mx.array(np.ascontiguousarray(b.T)).astype(dtype)  # [r, out]
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + (x @ self.delta_a) @ self.delta_b


def stack_frozen_adapter(model: nn.Module, deltas: dict, dtype: Any) -> None:
    """Put each module's frozen delta (``{path: (A [r, in], s B [out, r])}``) under its
    trainable adapter layer, or around the plain layer when the module is not adapted."""
    modules = dict(model.named_modules())
    replaced = []
    for path, (a, b) in deltas.items():
        module = modules.get(path)
        if module is None:
            raise ModelError(f"--init-adapter: the model has no module {path}")
        if hasattr(module, "lora_a"):
            module.linear = FrozenDelta(module.linear, a, b, dtype)
        else:
            replaced.append((path, FrozenDelta(module, a, b, dtype)))
    if replaced:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replaced))


def from_canonical(weights: dict[str, np.ndarray]) -> list[tuple[str, mx.array]]:
    """Canonical (PEFT-layout) adapter weights under mlx-lm's names and layouts."""
    back = {v: k for k, v in LORA_LEAVES.items()}
    out = []
    for name, array in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            array = array.T
        out.append((f"{module}.{back.get(leaf, leaf)}", mx.array(np.ascontiguousarray(array))))
    return out


def canonical_name(name: str, fine_tune_type: str) -> str:
    if fine_tune_type == "full" or name.startswith("v_head."):
        return name
    module, _, leaf = name.rpartition(".")
    return f"{module}.{LORA_LEAVES[leaf]}"


def to_canonical(params: dict[str, mx.array], fine_tune_type: str) -> dict[str, np.ndarray]:
    """Trainable parameters under the names and layouts both backends share (PEFT's)."""
    out = {}
    for name, value in params.items():
        array = np.array(value.astype(mx.float32))
        if fine_tune_type != "full" and name.rsplit(".", 1)[-1] in ("lora_a", "lora_b"):
            array = array.T
        out[canonical_name(name, fine_tune_type)] = array
    return out


def trainable(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def lm_head_module(model: nn.Module) -> tuple[nn.Module, str]:
    """The output projection: ``lm_head`` or, for tied embeddings, ``embed_tokens.as_linear``."""
    if hasattr(model, "lm_head"):
        return model.lm_head, "__call__"
    return model.model.embed_tokens, "as_linear"
