"""Reading a YAML mapping as typed settings, with errors that name the key.

A ``Key`` declares one setting: its name, its ``Type``, its default (or ``REQUIRED``), the
values or bounds it must keep, and a one-line meaning. ``gdmix.config_spec`` declares every
key of the run config so; the loader reads by those declarations, and the reference table
and JSON Schema are rendered from the same ones (``gdmix.config_reference``).

``Section`` wraps one mapping (``coordinates[1]``, ``spark``...): ``get`` reads a key as
declared (or as a type given in the call), and ``finish`` makes every key that is not
declared (or, undeclared, not read) an error, so a typo is never ignored.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()  # a key's default when the key must be given


@dataclass(frozen=True)
class Type:
    """What a key's value may be: ``read`` checks a YAML value (naming ``path`` in its
    error) and returns it as the loader keeps it; ``schema`` is the same rule as JSON
    Schema, for editors; ``label`` names it in the reference table."""
    label: str
    schema: dict
    read: Callable[[Any, str], Any]


@dataclass(frozen=True)
class Key:
    """One config key. Bounds: ``minimum`` (value >= it), ``above`` (value > it), ``below``
    (value < it); ``choices``: the values allowed. ``keys``: a mapping's own keys (a section,
    each item of a list of sections, each value of a mapping of named sections)."""
    name: str
    type: Type
    meaning: str
    default: Any = REQUIRED
    choices: tuple = ()
    minimum: float | None = None
    above: float | None = None
    below: float | None = None
    keys: tuple["Key", ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value, path: str):
        """``value`` (already of its type) against the key's choices and bounds."""
        if value is None:
            return value
        if self.choices and value not in self.choices:
            raise ConfigError(f"{path}: must be one of {self.choices}, got {value!r}")
        if self.above is not None and self.below is not None:
            if not self.above < value < self.below:
                raise ConfigError(f"{path}: must be between {self.above} and {self.below}, got {value}")
        elif self.above is not None and not value > self.above:
            raise ConfigError(f"{path}: must be > {self.above}, got {value!r}")
        if self.minimum is not None and not value >= self.minimum:
            raise ConfigError(f"{path}: must be >= {self.minimum}, got {value!r}")
        return value


def by_name(keys) -> dict[str, Key]:
    return {k.name: k for k in keys}


class Section:
    """A mapping being read; with declared ``keys``, every other key is an error, else
    the keys it did not read are."""

    def __init__(self, raw: Any, path: str, keys: tuple[Key, ...] | None = None):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
        self.raw, self.path, self.used = raw, path, set()
        self.keys = None if keys is None else by_name(keys)

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, kind=None, default=dataclasses.MISSING):
        """Key ``k`` as declared (``kind`` None), or read as ``kind`` with ``default``."""
        self.used.add(k)
        if kind is None:
            decl = self.keys[k]
            if k not in self.raw:
                if decl.required:
                    raise ConfigError(f"{self.key(k)}: required key is missing")
                return decl.default
            return decl.check(decl.type.read(self.raw[k], self.key(k)), self.key(k))
        if k not in self.raw:
            if default is dataclasses.MISSING:
                raise ConfigError(f"{self.key(k)}: required key is missing")
            return default
        return coerce(self.raw[k], kind, self.key(k))

    def section(self, k: str, required: bool = False) -> "Section":
        """The mapping under ``k`` (empty when absent or null), with ``k``'s declared keys."""
        self.used.add(k)
        keys = self.keys[k].keys if self.keys is not None else None
        if k not in self.raw or self.raw[k] is None:
            if required:
                raise ConfigError(f"{self.key(k)}: required key is missing")
            return Section({}, self.key(k), keys)
        return Section(self.raw[k], self.key(k), keys)

    def finish(self, allowed_extra=()):
        known = set(self.keys) if self.keys is not None else self.used
        unknown = set(self.raw) - known - set(allowed_extra)
        if unknown:
            k = sorted(unknown)[0]
            raise ConfigError(f"{self.key(k)}: unknown key (known: {', '.join(sorted(known))})")


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


def _typed(kind) -> Callable[[Any, str], Any]:
    return lambda value, path: coerce(value, kind, path)


def _names_pattern() -> str:
    return "^" + _NAME.pattern + "$"


# The value types of the run config's keys. A new type is one more ``Type``: its table
# label, its JSON Schema and the function the loader reads a value with.
BOOL = Type("bool", {"type": "boolean"}, _typed(bool))
INT = Type("int", {"type": "integer"}, _typed(int))
FLOAT = Type("number", {"type": "number"}, _typed(float))
STR = Type("string", {"type": "string", "minLength": 1}, _typed(str))
OPTIONAL_STR = Type("string or null", {"type": ["string", "null"], "minLength": 1}, _typed("optional_str"))
OPTIONAL_INT = Type("int or null", {"type": ["integer", "null"]}, _typed("optional_int"))
OPTIONAL_FLOAT = Type("number or null", {"type": ["number", "null"]},
                      lambda value, path: None if value is None else coerce(value, float, path))
STR_LIST = Type("list of strings", {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                _typed("str_list"))
INT_LIST = Type("list of ints", {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0}},
                lambda value, path: _positive_ints(value, path))
NAME = Type("name", {"type": "string", "pattern": _names_pattern()},
            lambda value, path: check_name(coerce(value, str, path), path))
QUANTITY_STR = Type("Kubernetes quantity or null", {"type": ["string", "null"], "pattern": QUANTITY.pattern},
                    lambda value, path: quantity(coerce(value, "optional_str", path), path))
STRING_MAP = Type("mapping of strings", {"type": ["object", "null"],
                                         "additionalProperties": {"type": ["string", "number", "boolean"]}},
                  lambda value, path: string_map(value or {}, path))
# Sections: mappings whose own keys are declared (``Key.keys``).
SECTION = Type("mapping", {"type": "object"}, _typed("mapping"))
OPTIONAL_SECTION = Type("mapping or null", {"type": ["object", "null"]},
                        lambda value, path: None if value is None else coerce(value, "mapping", path))
SECTION_LIST = Type("list of mappings", {"type": "array", "minItems": 1}, lambda value, path: value)
NAMED_SECTIONS = Type("mapping of name to mapping", {"type": "object", "minProperties": 1},
                      lambda value, path: value)


def _positive_ints(value, path):
    if not isinstance(value, list) or not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in value):
        raise ConfigError(f"{path}: expected a list of positive integers, got {value!r}")
    return tuple(value)
