"""Configs: ml_collections files selected as `path.py[:variant]`, plus field overrides.

Every config file defines `get_config(arg: str | None = None) -> ConfigDict`. Every
command takes `--config configs/demo.py:tiny` and any number of overrides
`--config.train.steps=100` (or `--config.train.steps 100`). An unknown field, an
unknown variant or a value of the wrong type stops with a ConfigError that names it.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import pathlib
from typing import Any, Sequence

import ml_collections

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, variant or override that cannot be applied."""


def _load_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"glipjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:  # configs raise ValueError for an unknown variant
        raise ConfigError(f"{spec}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


def _parse_value(field: str, old: Any, text: str) -> Any:
    if isinstance(old, str):
        return text
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{field}: expected a bool (true/false), got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if old is None:
        return value
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(old)(value)
    if type(value) is not type(old):
        raise ConfigError(
            f"--config.{field}: expected {type(old).__name__} (current value {old!r}), got {text!r}"
        )
    return value


def apply_override(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Sets `config.<field>` (a dotted path) from its command-line text."""
    *parents, leaf = field.split(".")
    node = config
    for i, key in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            raise ConfigError(f"Unknown config field: {'.'.join(parents[: i + 1])}")
        node = node[key]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        raise ConfigError(f"Unknown config field: {field}" + (f" (known here: {known})" if known else ""))
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"--config.{field} is a group of fields; override one of its fields")
    with node.unlocked():
        node[leaf] = _parse_value(field, node[leaf], text)


def _split_override(item: str) -> tuple[str, str]:
    body = item[len(OVERRIDE_PREFIX):] if item.startswith(OVERRIDE_PREFIX) else item
    field, eq, text = body.partition("=")
    if not eq:
        raise ConfigError(f"Override {item!r} has no value; write --config.{field}=VALUE")
    return field, text


def add_defaults(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    """Adds the fields of `defaults` that `config` lacks (recursively into groups)."""
    for key, value in defaults.items():
        if key not in config:
            config[key] = copy.deepcopy(value)
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
            add_defaults(config[key], value)


def load_config(
    spec: str, overrides: Sequence[str] = (), defaults: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """Loads `spec` ("configs/demo.py" or "configs/demo.py:tiny"), adds a command's
    `defaults` for fields the file lacks, and applies overrides
    ("--config.train.steps=10" or "train.steps=10")."""
    config = _load_file(spec)
    if defaults is not None:
        add_defaults(config, defaults)
    for item in overrides:
        apply_override(config, *_split_override(item))
    config.lock()
    return config


def parse_command_line(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    defaults: ml_collections.ConfigDict | None = None,
) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Parses a command's flags plus `--config SPEC` and `--config.field=value` overrides
    (`defaults`: the command's own fields, added where the config file lacks them).

    The parser must not define --config itself. Exits with a one-line message on a
    config error, like argparse does for its own flags.
    """
    parser.add_argument("--config", required=True, help="config file[:variant], e.g. configs/demo.py:tiny")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:  # "--config.a=1" or "--config.a" "1"
        if item.startswith(OVERRIDE_PREFIX):
            overrides.append(item)
        elif overrides and "=" not in overrides[-1]:
            overrides[-1] += "=" + item
        else:
            parser.error(f"unrecognized argument: {item}")
    try:
        config = load_config(args.config, overrides, defaults)
    except ConfigError as e:
        parser.error(str(e))
    return args, config


_ABSENT = object()


def changed_fields(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields whose values differ between two configs as JSON dicts (e.g. a run's
    saved config.json and the config of a rerun), as "field: before -> after"; a field
    that only one of them has is "(absent)" in the other."""
    def shown(value: Any) -> str:
        return "(absent)" if value is _ABSENT else repr(value)

    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_fields(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {shown(old)} -> {shown(new)}")
    return changes
