"""Typed, flat run configurations: YAML files plus ``key=value`` overrides, resolved once and saved with the run.

Unknown keys are errors. Nested sections (``pretrain.epochs=5`` in a benchmark) are dataclass fields whose type
is itself a config dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chestssl.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``annotation``; raise ConfigError if it can't."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in options:
                return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_type, where) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys raise ConfigError listing the valid ones."""
    fields = _field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    defaults = {field.name: field for field in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        field = defaults[name]
        if dataclasses.is_dataclass(fields[name]) and isinstance(value, dict):
            # a section given in part keeps the field's own defaults for the rest (not the section class's)
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            if dataclasses.is_dataclass(default):
                value = {**to_dict(default), **value}
        kwargs[name] = _coerce(value, fields[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from error


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` (or ``section.key=value``) strings to a nested dict of raw values."""
    values = json.loads(json.dumps(values))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, raw = override.split("=", 1)
        *sections, name = key.strip().split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {override!r}: {section!r} is not a section")
        target[name] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``overrides``; validated once."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        values = loaded
    values = apply_overrides(values, overrides or [])
    return from_dict(cls, values, where=cls.__name__)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the run's record of what it did)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line meaning: the comment after its declaration in ``cls``'s source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {field.name for field in dataclasses.fields(cls)}
    found = (_FIELD_COMMENT.match(line) for line in source.splitlines())
    return {match.group(1): match.group(2) for match in found if match and match.group(1) in names}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def describe_settings(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every setting of ``cls``, sections expanded as ``section.key``."""
    rows = []
    helps = field_help(cls)
    types_ = _field_types(cls)
    for field in dataclasses.fields(cls):
        annotation = types_[field.name]
        if dataclasses.is_dataclass(annotation):
            rows += describe_settings(annotation, f"{prefix}{field.name}.")
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        shown = "required" if default is dataclasses.MISSING else json.dumps(
            list(default) if isinstance(default, tuple) else default)
        rows.append((prefix + field.name, _type_name(annotation), shown, helps.get(field.name, "")))
    return rows


def settings_help(cls: type) -> str:
    """The settings of ``cls`` as text for ``--help``: one line each, generated so it cannot drift."""
    rows = describe_settings(cls)
    width = max(len(key) for key, *_ in rows)
    lines = ["settings (key=value; sections as section.key=value):"]
    for key, kind, default, meaning in rows:
        lines.append(f"  {key.ljust(width)}  {meaning} [{kind}, default {default}]")
    return "\n".join(lines)
