"""The checks of one config value (its type, choices, range) and of a mapping's keys; each failure is a ConfigError
that names the value's path in the config file."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from frankenmoe.errors import ConfigError

T = TypeVar("T")


def bounded_repr(value: Any) -> str:
    """repr() cut short: a config value can be huge or nested (YAML aliases), an error message must not be."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4


def _where(path: str) -> str:
    return f"`{path}`" if path else "the top level"


def check_keys(data: Mapping[str, Any], valid: tuple[str, ...], path: str, source: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} in {_where(path)} is not a string. Keys must be names.")
        if key not in valid:
            full = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"Did you mean `{close[0]}`?" if close else f"Valid keys here: {', '.join(valid)}."
            raise ConfigError(f"{source}: unknown key `{full}`. {hint}")


def require(data: Mapping[str, Any], key: str, path: str, source: str) -> None:
    if key not in data or data[key] is None:
        full = f"{path}.{key}" if path else key
        raise ConfigError(f"{source}: `{full}` is required but missing.")


def type_error(value: Any, expected: str, path: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: `{path}` must be {expected}, not {type(value).__name__} {bounded_repr(value)}.")


def as_mapping(value: Any, path: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise type_error(value, "a mapping of keys to values", path, source)
    return value


def as_sequence(value: Any, path: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise type_error(value, "a list", path, source)
    return value


def as_string(value: Any, path: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise type_error(value, "a non-empty string", path, source)
    return value


def as_choice(value: Any, choices: tuple[str, ...], path: str, source: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{source}: `{path}` is {bounded_repr(value)}; it must be one of: {', '.join(choices)}.")
    return value


def as_integer(value: Any, path: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(value, "a whole number", path, source)
    return value


def as_number(value: Any, path: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise type_error(value, "a number", path, source)
    if abs(value) == float("inf"):
        raise type_error(value, "a finite number", path, source)
    return float(value)


def as_non_negative_number(value: Any, path: str, source: str) -> float:
    number = as_number(value, path, source)
    if number < 0:
        raise ConfigError(f"{source}: `{path}` is {number}; it must be 0 or more.")
    return number


def as_positive_number(value: Any, path: str, source: str) -> float:
    number = as_number(value, path, source)
    if number <= 0:
        raise ConfigError(f"{source}: `{path}` is {number}; it must be greater than 0.")
    return number


def as_boolean(value: Any, path: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise type_error(value, "true or false", path, source)
    return value


def as_prompts(value: Any, path: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = as_sequence(value, path, source)
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise type_error(prompt, "a string (quote it in the YAML)", f"{path}[{index}]", source)
        if not prompt.strip():
            raise ConfigError(f"{source}: `{path}[{index}]` is an empty prompt. Remove it or write some text.")
    return tuple(items)


def optional(value: Any, convert: Callable[[Any, str, str], T], path: str, source: str) -> T | None:
    return None if value is None else convert(value, path, source)
