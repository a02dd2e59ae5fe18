"""Load an HF model dir through mlx-lm and attach LoRA / DoRA adapters (or unfreeze everything).

Adapter layers are mlx-lm's own ``LoRALinear`` / ``DoRALinear`` (so ``mlx_lm.load(...,
adapter_path=...)`` rebuilds exactly what we trained), with ``lora_a`` re-initialised from
``algorithms.backend.lora_a_init`` so MLX and torch start from identical adapters. mlx-lm stores
``lora_a`` as ``[in, r]`` and ``lora_b`` as ``[r, out]`` (``y = Wx + scale * (x A) B``); PEFT's
layout is the transpose, and ``canonical_name`` / ``to_canonical`` map between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from algorithms.backend import lora_a_init
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
    if getattr(cfg, "grad_checkpoint", False):  # --grad-checkpoint (mlx_ft/grad_checkpoint.py)
        import sys

        from .grad_checkpoint import enable

        print(f"mlx_ft: grad-checkpoint: {enable(model)} blocks keep only their input and are "
              "recomputed in backward", file=sys.stderr, flush=True)
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
