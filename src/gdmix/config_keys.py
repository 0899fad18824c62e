"""Reading a YAML mapping as typed settings, with errors that name the key.

``Section`` wraps one mapping (``coordinates[1]``, ``spark``...): ``get`` reads a key as a
type, with a default or as required, and ``finish`` makes every key it did not read an
error, so a typo is never ignored. ``gdmix.config`` reads the run config with it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


class Section:
    """A mapping being read; records which keys were used so unknown keys are errors."""

    def __init__(self, raw: Any, path: str):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.path, self.used = raw, path, set()

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, kind, default=dataclasses.MISSING):
        self.used.add(k)
        if k not in self.raw:
            if default is dataclasses.MISSING:
                raise ConfigError(f"{self.key(k)}: required key is missing")
            return default
        return coerce(self.raw[k], kind, self.key(k))

    def section(self, k: str, required: bool = False) -> "Section":
        self.used.add(k)
        if k not in self.raw or self.raw[k] is None:
            if required:
                raise ConfigError(f"{self.key(k)}: required key is missing")
            return Section({}, self.key(k))
        return Section(self.raw[k], self.key(k))

    def finish(self, allowed_extra=()):
        unknown = set(self.raw) - self.used - set(allowed_extra)
        if unknown:
            k = sorted(unknown)[0]
            raise ConfigError(f"{self.key(k)}: unknown key (known: {', '.join(sorted(self.used))})")


def coerce(value, kind, path):
    if kind == "optional_int":
        if value is None:
            return None
        kind = int
    if kind == "optional_str":
        if value is None:
            return None
        kind = str
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str) and value:
            return value
    elif kind == "mapping":
        if isinstance(value, dict):
            return value
    elif kind == "str_list":
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        raise ConfigError(f"{path}: expected a non-empty list of column names, got {value!r}")
    else:  # pragma: no cover - programming error
        raise TypeError(kind)
    raise ConfigError(f"{path}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def positive(value, path, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def mapping(value: dict, path: str) -> dict:
    return {str(k): v for k, v in value.items()}


def string_map(value, path) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of Spark settings, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")


def quantity(value, path):
    if value is not None and not QUANTITY.match(value):
        raise ConfigError(f"{path}: expected a Kubernetes quantity as a string (e.g. \"2\", \"500m\", \"4Gi\"), "
                          f"got {value!r}")
    return value


_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_name(name: str, key: str) -> str:
    """The one rule for names that become file and folder names (feature bags,
    coordinates): ASCII letters, digits, '-' and '_', so none can leave the work directory."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{key}: use letters, digits, '-' and '_' only, got {name!r}")
    return name
