"""GGUF subcommands of `python -m converters` (see converters/__main__.py).

    python -m converters gguf-to-hf model.gguf out_dir [--dtype bfloat16] [--force]
    python -m converters gguf-to-mlx model.gguf out_dir [--dtype float16] [--requantize-bits 4]
    python -m converters hf-to-gguf model_dir model.gguf [--outtype q8_0] [--force]
"""

from __future__ import annotations

import argparse

from .gguf_to_hf import DTYPES
from .models import resolve_input


def _gguf_to_hf(args: argparse.Namespace) -> int:
    from .gguf_to_hf import gguf_to_hf

    print(gguf_to_hf(args.src, args.out, dtype=args.dtype, force=args.force))
    return 0


def _add_gguf_to_hf(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gguf-to-hf", help="import a llama / qwen2 GGUF file as a Hugging Face model directory",
        description="Dequantise a GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants...) and write "
                    "config, safetensors and tokenizer files.")
    parser.add_argument("src", help="the .gguf file")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype in the safetensors (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")
    parser.set_defaults(func=_gguf_to_hf)


def _gguf_to_mlx(args: argparse.Namespace) -> int:
    from .gguf_to_mlx import gguf_to_mlx

    print(gguf_to_mlx(args.src, args.out, dtype=args.dtype, force=args.force,
                      requantize_bits=args.requantize_bits, group_size=args.group_size))
    return 0


def _add_gguf_to_mlx(subparsers: argparse._SubParsersAction) -> None:
    from .gguf_to_mlx import MLX_DTYPES

    parser = subparsers.add_parser(
        "gguf-to-mlx", help="convert a GGUF to an MLX model dir, Q4_0/Q4_1/Q8_0 kept quantised",
        description="Q4_0 / Q4_1 / Q8_0 matrices become MLX affine group-32 4-/8-bit weights "
                    "with no loss; other tensors are dequantised (or re-quantised on request).")
    parser.add_argument("src", help="the .gguf file")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=MLX_DTYPES, default="float32",
                        help="scales, biases and unquantised weights (float32 is exact; "
                             "default: %(default)s)")
    parser.add_argument("--requantize-bits", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
                        help="also quantise the matrices stored in other formats (lossy)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64,
                        help="group size for --requantize-bits (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")
    parser.set_defaults(func=_gguf_to_mlx)


def _hf_to_gguf(args: argparse.Namespace) -> int:
    from .hf_to_gguf import hf_to_gguf

    print(hf_to_gguf(resolve_input(args.src), args.out, outtype=args.outtype, force=args.force,
                     name=args.name))
    return 0


def _add_hf_to_gguf(subparsers: argparse._SubParsersAction) -> None:
    from .hf_to_gguf import OUTTYPES

    parser = subparsers.add_parser(
        "hf-to-gguf", help="write a llama / qwen2 HF (or fused) model dir as one GGUF file",
        description="Tensor names, q/k permutation and metadata as llama.cpp's converter writes "
                    "them; weights in F16 or Q8_0 (also f32, bf16, q4_0, q4_1).")
    parser.add_argument("src", help="the Hugging Face model directory or Hub id")
    parser.add_argument("out", help="the .gguf file to write (must not exist unless --force)")
    parser.add_argument("--outtype", choices=tuple(OUTTYPES), default="f16",
                        help="matrix type (default: %(default)s)")
    parser.add_argument("--name", default=None, help="general.name (default: the dir's name)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=_hf_to_gguf)


VERBS = (_add_gguf_to_hf, _add_gguf_to_mlx, _add_hf_to_gguf)
