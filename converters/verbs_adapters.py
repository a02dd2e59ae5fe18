"""Subcommands of `python -m converters` (see converters/__main__.py): adapters and fuse.

    python -m converters mlx-adapter-to-peft ADAPTER_DIR OUT [--base MODEL_DIR] [--force]
    python -m converters peft-to-mlx-adapter ADAPTER_DIR OUT [--base MODEL_DIR] [--force]
    python -m converters fuse MODEL_DIR ADAPTER_DIR OUT [--format {hf,mlx}]
                              [--dequantize | --quantize BITS [--group-size N]] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .models import resolve_input


def _adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the adapter directory (or Hub id) to convert")
    parser.add_argument("out", help="output adapter directory (must not exist unless --force)")
    parser.add_argument("--base", default=None, metavar="MODEL_DIR",
                        help="the base model dir or Hub id (HF or MLX): check every adapter "
                             "shape against it and count its blocks (needed for some "
                             "layers_to_transform)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")


def _base(args: argparse.Namespace) -> Path | None:
    return None if args.base is None else resolve_input(args.base)


def _mlx_adapter_to_peft(args: argparse.Namespace) -> int:
    from .adapters import mlx_adapter_to_peft

    print(mlx_adapter_to_peft(resolve_input(args.src, "adapter"), args.out, base=_base(args),
                              force=args.force))
    return 0


def _add_mlx_adapter_to_peft(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mlx-adapter-to-peft", help="mlx-lm LoRA/DoRA adapter -> PEFT adapter",
        description="Write adapter_model.safetensors + adapter_config.json that "
                    "peft.PeftModel.from_pretrained loads (lora_A = lora_a^T, lora_B = lora_b^T, "
                    "lora_alpha = scale * r).")
    _adapter_args(parser)
    parser.set_defaults(func=_mlx_adapter_to_peft)


def _peft_to_mlx_adapter(args: argparse.Namespace) -> int:
    from .adapters import peft_to_mlx_adapter

    print(peft_to_mlx_adapter(resolve_input(args.src, "adapter"), args.out, base=_base(args),
                              force=args.force))
    return 0


def _add_peft_to_mlx_adapter(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "peft-to-mlx-adapter", help="PEFT LoRA/DoRA adapter -> mlx-lm adapter",
        description="Write adapters.safetensors + adapter_config.json that "
                    "mlx_lm.load(model, adapter_path=...) loads (lora_a = lora_A^T, "
                    "lora_b = lora_B^T, scale = lora_alpha / r).")
    _adapter_args(parser)
    parser.set_defaults(func=_peft_to_mlx_adapter)


def _fuse(args: argparse.Namespace) -> int:
    from .fuse import fuse

    print(fuse(resolve_input(args.model), resolve_input(args.adapter, "adapter"), args.out,
               fmt=args.format, dequantize_all=args.dequantize, quantize_bits=args.quantize,
               group_size=args.group_size, force=args.force,
               ignore_base_fingerprint=args.ignore_base_fingerprint))
    return 0


def _add_fuse(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fuse", help="merge a LoRA/DoRA adapter (mlx-lm or PEFT) into a model dir (HF or MLX)",
        description="Merge the adapter into the base weights shard by shard. The output has the "
                    "base's format; a quantised MLX base is re-quantised with its own settings "
                    "unless --dequantize or --quantize says otherwise.")
    parser.add_argument("model", help="the base model directory or Hub id")
    parser.add_argument("adapter", help="the adapter directory or Hub id (adapters.safetensors or "
                                        "adapter_model.safetensors inside)")
    parser.add_argument("out", help="output model directory (must not exist unless --force)")
    parser.add_argument("--format", default=None, choices=("hf", "mlx"),
                        help="the base model's format, and the output's (default: detected "
                             "from the dir, as converters info does)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--dequantize", action="store_true",
                       help="write the fused MLX model unquantised")
    quant.add_argument("--quantize", type=int, default=None, metavar="BITS",
                       help="re-quantise the fused MLX model to BITS (2, 3, 4, 5, 6 or 8)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="group size for --quantize (32, 64 or 128; default 64)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")
    parser.add_argument("--ignore-base-fingerprint", action="store_true",
                        help="fuse although the adapter records other base weights (the same "
                             "model in another format); another architecture is always refused")
    parser.set_defaults(func=_fuse)


VERBS = (_add_mlx_adapter_to_peft, _add_peft_to_mlx_adapter, _add_fuse)
