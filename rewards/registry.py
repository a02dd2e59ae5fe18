"""Find reward functions by spec: built-ins, plugin files, modules, entry points, reward models.

``load_reward(spec)`` accepts, tried in this order:

- ``model:<path-or-id>``: a reward model, built by the active backend's ``model_loader``;
- ``name`` or ``name(args)``: a built-in (``math_answer``, ``xml_tags(think, answer)``,
  ``soft_overlong_punishment(max_length=4096, buffer=512)``), else an entry point of that name in
  the group ``posttrain.rewards``;
- ``path/to/file.py:function``: a function in a Python file (run as a fresh module);
- ``package.module:function``: a function in an importable module.

Arguments use Python call syntax; a bare word is a string (``xml_tags(think, answer)``). With
arguments, the target is called as a factory and must return the reward function. Every failure
(no such file, import error, missing attribute, not callable, wrong signature, unknown name) is a
``RewardError`` naming the spec, raised here, before any model is loaded.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .builtins import BUILTINS
from .contract import RewardError, RewardFunction

ENTRY_POINT_GROUP = "posttrain.rewards"

_NAME_CALL = re.compile(r"([A-Za-z_][\w.\-]*)\s*(\((.*)\))?", re.DOTALL)


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0].strip() if doc else "(no description)"


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def list_rewards() -> list[tuple[str, str]]:
    """Every available reward as ``(name, one-line description)``: built-ins, then entry points."""
    rows = [(name, _first_line(obj)) for name, (obj, _) in BUILTINS.items()]
    for ep in _entry_points():
        try:
            rows.append((ep.name, _first_line(ep.load())))
        except Exception as e:  # noqa: BLE001 - listed, not fatal
            rows.append((ep.name, f"(failed to load {ep.value}: {e!r})"))
    return rows


def format_reward_list(rows: list[tuple[str, str]] | None = None) -> str:
    """The ``--list-rewards`` text: one aligned ``name  description`` line per reward."""
    rows = list_rewards() if rows is None else rows
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name.ljust(width)}  {desc}" for name, desc in rows)


def _parse_args(spec: str, text: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call)

        def value(node: ast.expr) -> Any:
            return node.id if isinstance(node, ast.Name) else ast.literal_eval(node)

        return ([value(a) for a in call.args],
                {kw.arg: value(kw.value) for kw in call.keywords if kw.arg})
    except (SyntaxError, ValueError, AssertionError) as e:
        raise RewardError(f"reward {spec!r}: cannot parse the arguments ({text}): {e}") from None


def _checked(spec: str, obj: Any) -> RewardFunction:
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {type(obj).__name__} object is not callable")
    try:
        inspect.signature(obj).bind([], [], completion_ids=None, step=0)
    except TypeError:
        raise RewardError(f"reward {spec!r}: must accept (prompts, completions, **kwargs)"
                          ) from None
    except ValueError:
        pass  # no signature (a builtin): trust it
    return obj


def _build(spec: str, target: Any, args_text: str | None, is_factory: bool) -> RewardFunction:
    if args_text is None and not is_factory:
        return _checked(spec, target)
    args, kwargs = _parse_args(spec, args_text or "")
    try:
        return _checked(spec, target(*args, **kwargs))
    except RewardError:
        raise
    except Exception as e:  # a factory's own complaint, reported with the spec
        raise RewardError(f"reward {spec!r}: {e}") from e


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: file not found: {path.resolve()}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"posttrain_reward_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(module_name, None)
        raise RewardError(f"reward {spec!r}: failed to import {path}: {e!r}") from e
    return module


def _import_module(spec: str, dotted: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except (Exception, SystemExit) as e:
        raise RewardError(f"reward {spec!r}: failed to import module {dotted!r}: {e!r}") from e


def load_reward(spec: str, model_loader: Callable[[str], RewardFunction] | None = None
                ) -> RewardFunction:
    """The reward function named by ``spec`` (module docstring). ``model_loader(path)`` is the
    backend's reward-model constructor, needed only for ``model:`` specs."""
    spec = spec.strip()
    if spec.startswith("model:"):
        if model_loader is None:
            raise RewardError(f"reward {spec!r}: reward models need a backend; none was given")
        return _checked(spec, model_loader(spec[len("model:"):]))
    match = _NAME_CALL.fullmatch(spec)
    if match and ":" not in spec:
        name, args_text = match.group(1), match.group(3)
        if name in BUILTINS:
            target, is_factory = BUILTINS[name]
            return _build(spec, target, args_text, is_factory)
        for ep in _entry_points():
            if ep.name == name:
                try:
                    target = ep.load()
                except Exception as e:
                    raise RewardError(f"reward {spec!r}: entry point {ep.value!r} in group "
                                      f"{ENTRY_POINT_GROUP!r} failed to load: {e!r}") from e
                return _build(spec, target, args_text, False)
        known = list(BUILTINS) + [ep.name for ep in _entry_points()]
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewardError(f"reward {spec!r}: no built-in or {ENTRY_POINT_GROUP!r} entry point "
                          f"of that name{hint} (see --list-rewards)")
    where, sep, attr_spec = spec.rpartition(":")
    attr_match = _NAME_CALL.fullmatch(attr_spec.strip())
    if not sep or not where or not attr_match or "." in attr_match.group(1):
        raise RewardError(f"reward {spec!r}: expected a built-in name, path/to/file.py:function "
                          f"or package.module:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(spec, Path(where))
    else:
        module = _import_module(spec, where)
    attr, args_text = attr_match.group(1), attr_match.group(3)
    if not hasattr(module, attr):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RewardError(f"reward {spec!r}: {where} has no attribute {attr!r} "
                          f"(callables there: {', '.join(sorted(found)) or 'none'})")
    return _build(spec, getattr(module, attr), args_text, False)
