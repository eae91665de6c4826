"""Typed dataclass configs that reject unknown keys and ill-typed values.

`from_dict(cls, data)` builds a (possibly nested) dataclass from plain
JSON/YAML data, converting lists to tuples where the field is a tuple, and
raises a `ConfigError` (a ValueError) that names the offending key and says
what is valid: unknown keys (listing the valid ones), a value outside a
`Literal` (listing the choices), a bool where a number is expected (YAML reads
`yes` as true), a list of the wrong length, an element of the wrong type.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be accepted; the message names the key."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{where}: a value is required, got null.")
        if len(args) == 1:
            return _convert(args[0], value, where)
        errors = []
        for arg in args:  # first alternative that accepts the value
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of the accepted types ({'; '.join(errors)}).")
    if value is None:
        raise ConfigError(f"{where}: a value is required, got null.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}.")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}.")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_convert(items[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(items):
            raise ConfigError(f"{where}: expected a list of {len(items)} values, got {value!r}.")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with string keys, got {value!r}.")
        return dict(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got the boolean {value!r} (YAML reads "
                          "yes/no/on/off as booleans).")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}.")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Builds dataclass `cls` from `data`, rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"Unknown config key(s) {[prefix + k for k in unknown]} for "
            f"{cls.__name__}; valid keys are {sorted(fields)}.")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, sub)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain JSON-ready data from a (nested) dataclass; tuples become lists.

    A dataclass may name fields that are written only when they differ from
    their defaults (`OMIT_AT_DEFAULT`): settings added later, so that the
    files of everything that does not use them stay as they were (saved
    configs, run identities)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        omit = getattr(type(obj), "OMIT_AT_DEFAULT", ())
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.name in omit and getattr(obj, f.name) == f.default)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
