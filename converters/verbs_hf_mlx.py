"""Subcommands of `python -m converters` (see converters/__main__.py): hf-to-mlx, mlx-to-hf, info.

    python -m converters hf-to-mlx HF_DIR OUT [--dtype bfloat16] [--bits 4 --group-size 64
                                                [--mixed]] [--max-shard-size 5GB] [--force]
    python -m converters mlx-to-hf MLX_DIR OUT [--dtype float32] [--max-shard-size 5GB] [--force]
    python -m converters info PATH [--json]

Values are checked by the library functions (one place for the rules and their messages), so
`--bits` and `--group-size` take any integer here and a bad one is reported as an error.
"""

from __future__ import annotations

import argparse

from .hf_mlx import DTYPES, GROUP_SIZES, MIXED_BITS, QUANT_BITS, hf_to_mlx, mlx_to_hf
from .inspect import _add_info
from .models import resolve_input
from .shards import DEFAULT_MAX_SHARD_BYTES, parse_size


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, metavar="DTYPE",
                        help=f"cast floating tensors to one of {', '.join(DTYPES)} "
                             "(default: keep each tensor's dtype)")
    parser.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), metavar="SIZE",
                        help="largest output shard, e.g. 5GB, 500MB, 2GiB (default: 5 GiB)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")


def _hf_to_mlx(args: argparse.Namespace) -> int:
    out = hf_to_mlx(resolve_input(args.src), args.out, dtype=args.dtype, bits=args.bits,
                    group_size=args.group_size, mixed=args.mixed, force=args.force,
                    max_shard_bytes=parse_size(args.max_shard_size))
    print(out)
    return 0


def _add_hf_to_mlx(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "hf-to-mlx", help="convert a Hugging Face model dir into an mlx-lm model dir",
        description="Stream an HF model dir (safetensors) into an mlx-lm model dir, optionally "
                    "cast and affine-quantised. Loads with mlx_lm.load.")
    parser.add_argument("src", help="HF model dir (config.json + safetensors) or Hub id")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--bits", type=int, default=None,
                        help=f"quantise to this many bits ({', '.join(map(str, QUANT_BITS))})")
    parser.add_argument("--group-size", type=int, default=64,
                        help=f"quantisation group size ({', '.join(map(str, GROUP_SIZES))}; "
                             "default: %(default)s)")
    parser.add_argument("--mixed", action="store_true",
                        help=f"keep embed_tokens and lm_head at {MIXED_BITS} bits (needs --bits)")
    _add_common(parser)
    parser.set_defaults(func=_hf_to_mlx)


def _mlx_to_hf(args: argparse.Namespace) -> int:
    out = mlx_to_hf(resolve_input(args.src), args.out, dtype=args.dtype, force=args.force,
                    max_shard_bytes=parse_size(args.max_shard_size))
    print(out)
    return 0


def _add_mlx_to_hf(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mlx-to-hf", help="convert an mlx-lm model dir (quantised or not) into an HF model dir",
        description="Dequantise and undo mlx-lm's sanitize, writing an HF model dir that loads "
                    "with transformers.AutoModelForCausalLM.")
    parser.add_argument("src", help="mlx-lm model dir (config.json + safetensors) or Hub id")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    _add_common(parser)
    parser.set_defaults(func=_mlx_to_hf)


VERBS = (_add_hf_to_mlx, _add_mlx_to_hf, _add_info)
