"""Flags and YAML -> a validated config dataclass (:func:`build_config`), and the argparse parser
the dataclass's field metadata generates (:func:`make_parser`).

``--config run.yaml`` sets any field (also a run's own ``config.json``); flags given on the
command line override it; an unknown flag or key is an error naming the nearest valid one; a
value of the wrong type names the flag and what it expects. Field aliases (TRL's names) are
accepted as flags and keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.cli import ArgumentParser

from .config import ConfigError, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _nearest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def _field_type(cls: type, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming it."""
    kind = _field_type(cls, f)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is list and f.metadata.get("raw"):
            if isinstance(value, (str, dict)):
                return [value]
            if isinstance(value, (list, tuple)):
                return list(value)
            raise ValueError(value)
        if kind is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            if not f.metadata.get("split", True):
                return [str(v) for v in value]
            return [v for item in value for v in str(item).replace(",", " ").split() if v]
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {_flag(f.name)} expects {kind.__name__}, got {value!r}"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of option: value, got {type(data).__name__}")
    return data


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping with the same key twice (YAML keeps the last
        silently, so one of the two settings would be ignored)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (line {seen[key]} and line "
                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


# Keys a run's own config.json carries besides the options: what ran it. Accepted in --config
# so a run reproduces from its record (``algorithm`` must match; the others are informative).
RECORD_KEYS = ("algorithm", "backend", "model_path")
# Actions of one invocation, not settings: a run record's value is not replayed.
NOT_REPLAYED = ("resume",)


def _unknown(name: str, names: dict[str, str], where: str) -> ConfigError:
    """An unknown flag / key: a peer tool's equivalent when we know one, else the nearest."""
    from .peer_flags import peer_hint

    key = name.strip("'\"").lstrip("-").replace("-", "_")
    hint = peer_hint(key, set(names.values()))
    if hint is not None:
        return ConfigError(f"{where} {name}: another tool's option; here: {hint}")
    near = _nearest(key, list(names)) if where != "unknown flag" else \
        _nearest(name, [_flag(n) for n in names] + ["--config"])
    return ConfigError(f"{where} {name}{near}")


def _record_keys(data: dict, path: str, algorithm: str | None, cls: type) -> dict:
    """``data`` without a run record's own keys; an error when it is another algorithm's."""
    if not any(k in data for k in RECORD_KEYS):
        return data
    recorded = data.get("algorithm")
    if algorithm and recorded not in (None, algorithm, cls.__name__):
        raise ConfigError(f"{path}: the config of a {recorded!r} run; this is {algorithm!r} "
                          f"(run it with the {recorded} command)")
    return {k: v for k, v in data.items() if k not in RECORD_KEYS + NOT_REPLAYED}


def build_config(cls: type, argv: Sequence[str], prog: str,
                 algorithm: str | None = None) -> TrainConfig:
    """Parse ``argv`` (flags and an optional ``--config``: YAML, or a run's ``config.json``)
    into a validated ``cls`` instance; ``algorithm`` is the command's name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    names.update({name: name for name in fields})
    parser = make_parser(cls, prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown(unknown[0].split("=")[0], names, "unknown flag")
    values: dict[str, Any] = {}
    if args.config:
        data = _record_keys(load_yaml(args.config), args.config, algorithm, cls)
        for key, value in data.items():
            name = names.get(str(key).replace("-", "_"))
            if name is None:
                raise _unknown(repr(key), names, f"{args.config}: unknown key")
            if name in values:
                raise ConfigError(f"{args.config}: {key!r} sets --{name.replace('_', '-')} a "
                                  "second time (it is another name of the same option)")
            values[name] = _coerce(cls, fields[name], value, args.config)
    for name, f in fields.items():
        value = getattr(args, name)
        if value is not None:
            values[name] = _coerce(cls, f, value, "command line")
    cfg = cls(**values)
    cfg.validate()
    return cfg


def make_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog, description=(cls.__doc__ or "").strip(), allow_abbrev=False
    )
    parser.add_argument("--config", help="YAML file setting any option below, or a run's "
                        "config.json (reruns that run); flags override it")
    if any(f.name == "reward" for f in dataclasses.fields(cls)):
        parser.add_argument("--list-rewards", action="store_true",
                            help="list the built-in and installed reward functions, then exit")
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        aliases = [_flag(a) for a in f.metadata.get("aliases", ())]
        also = f" (also {', '.join(aliases)})" if aliases else ""
        helptext = f"{f.metadata.get('help', '')} (default: {default!r}){also}"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": helptext}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            # A switch that is on by default is shown as its --no- form (--no-progress).
            on = default is True
            parser.add_argument(_flag(f.name), *aliases, action="store_const", const=True,
                                **{**kw, "help": argparse.SUPPRESS if on else helptext})
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_const",
                                const=False, dest=f.name,
                                help=f"turn off: {helptext}" if on else argparse.SUPPRESS)
        elif kind is list:
            parser.add_argument(_flag(f.name), *aliases, nargs="*", action="extend", **kw)
        else:
            parser.add_argument(_flag(f.name), *aliases, type=str, **kw)
    return parser
