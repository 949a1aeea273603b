"""Config text to plain YAML data: a safe loader that refuses a key given twice, and errors that say where."""

from __future__ import annotations

from typing import Any

import yaml

from frankenmoe.config.values import bounded_repr
from frankenmoe.errors import ConfigError


def read_yaml(text: str, source_name: str) -> Any:
    """The YAML data `text` holds (mappings, lists, scalars); an unreadable text is a ConfigError that says where."""
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: data only, never Python objects
    except _DuplicateKeyError as error:
        raise ConfigError(
            f"{source_name}: the key {error.key_text} is given twice in the same mapping, {error.places}. YAML would "
            "silently keep only the second value; remove the one you did not mean."
        ) from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or (str(error).splitlines() or ["unreadable text"])[0]
        if isinstance(error, yaml.constructor.ConstructorError):
            fix = "Quote the value there if it is meant as text, and remove any `!!` tag."
        else:
            fix = "Fix the YAML syntax there (indentation, quotes, a missing ':')."
        raise ConfigError(
            f"{source_name} is not valid YAML: {problem} at {_yaml_error_place(error, text)}. {fix}"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{source_name} nests lists or mappings thousands of levels deep, which no merge config does. "
            "Check that the file is the config you meant."
        ) from None
    return data


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice; `places` says where the two keys are, for the message."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key_text = f"`{key}`" if isinstance(key, str) else bounded_repr(key)
        if first.line == second.line:  # a flow mapping such as {a: 1, a: 2}
            self.places = f"on line {first.line + 1} (columns {first.column + 1} and {second.column + 1})"
        else:
            self.places = f"on lines {first.line + 1} and {second.line + 1}"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a value YAML cannot build (a date such as 2024-13-45, `!!int 0x`)
    becomes a YAML error at that value's line and column instead of a bare ValueError, and a key given
    twice in one mapping is an error instead of the last value silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_unique_keys(node)
        return super().construct_mapping(node, deep)

    def _check_unique_keys(self, node: yaml.MappingNode) -> None:
        # Only the mapping's own keys count: a key written after `<<: *defaults` overrides the default
        # by YAML's merge rule, which is what such a config means.
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:
                continue  # an unhashable key: SafeLoader's own construct_mapping reports it

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as error:
            what = f"the value {bounded_repr(node.value)}" if isinstance(node, yaml.ScalarNode) else "a value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what} ({error})", node.start_mark
            ) from None


def _yaml_error_place(error: yaml.YAMLError, text: str) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return f"line {line}, column {column}"
    return "an unknown place"
