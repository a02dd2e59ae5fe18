"""Subcommands of `python -m converters` (see converters/__main__.py)."""

VERBS = ()
