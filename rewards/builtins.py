"""The built-in rewards, by the name ``load_reward`` and ``--list-rewards`` know them.

Functions are used as they are; factories are called (with the spec's arguments, or none) to make
the reward function. Import any of them directly to use them from Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .code_exec import make_code_exec
from .formatting import format_regex, json_schema, json_valid, xml_tags
from .length import length_penalty, soft_overlong_punishment
from .math_answer import math_answer

# name -> (function or factory, is_factory)
BUILTINS: dict[str, tuple[Callable[..., Any], bool]] = {
    "math_answer": (math_answer, False),
    "format_regex": (format_regex, True),
    "xml_tags": (xml_tags, True),
    "json_valid": (json_valid, False),
    "json_schema": (json_schema, True),
    "length_penalty": (length_penalty, True),
    "soft_overlong_punishment": (soft_overlong_punishment, True),
    "code_exec": (make_code_exec, True),
}

__all__ = ["BUILTINS", "format_regex", "json_schema", "json_valid", "length_penalty",
           "make_code_exec", "math_answer", "soft_overlong_punishment", "xml_tags"]
