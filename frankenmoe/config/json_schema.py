"""The JSON Schema (draft 2020-12) of the merge config, generated from the config dataclasses' field metadata.

The package ships it as frankenmoe/schema/frankenmoe-config.schema.json, for editors' YAML language servers
(docs/config.md says how to use it). After changing a key in frankenmoe.config.schema, regenerate the file with

    python -m frankenmoe.config.json_schema > frankenmoe/schema/frankenmoe-config.schema.json

(tests/test_config_schema.py fails while the two differ). The schema checks what one key says on its own: the
keys each mapping allows, each value's type, choices and range, and which `shared_weights` keys each method reads.
Rules that relate keys to each other or to the models (experts_per_token against the number of experts, prompts
per gate mode, laser's method-only keys) stay with the parser, whose messages an editor cannot give anyway.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from frankenmoe.config.constants import BASE_LASER_MATRICES, EXPERT_LASER_MATRICES, TRUNK_METHOD_KEYS
from frankenmoe.config.schema import (
    SHARED_EXPERT_KEYS,
    ExpertConfig,
    LaserConfig,
    MergeConfig,
    RouterConfig,
    SharedWeightsConfig,
    yaml_fields,
)

SCHEMA_FILE = Path(__file__).parents[1] / "schema" / "frankenmoe-config.schema.json"
"""The shipped copy of `config_schema_text()`."""


def config_schema() -> dict[str, Any]:
    """The whole config's JSON Schema; `$defs` holds each nested mapping under the name the metadata's $refs use."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "frankenmoe merge config",
        **_mapping_schema(MergeConfig),
        "$defs": {
            "expert": _mapping_schema(ExpertConfig),
            "shared_expert": _mapping_schema(ExpertConfig, SHARED_EXPERT_KEYS),
            "router": _mapping_schema(RouterConfig),
            "shared_weights": _shared_weights_schema(),
            "expert_laser": _laser_schema(EXPERT_LASER_MATRICES),
            "base_laser": _laser_schema(BASE_LASER_MATRICES),
        },
    }


def config_schema_text() -> str:
    """The schema as the shipped file holds it (stable key order, so a diff shows what changed)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def _mapping_schema(config_class: type, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One YAML mapping: every YAML field of `config_class` (or only `keys`), and no other key."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, key in yaml_fields(config_class):
        if keys is not None and name not in keys:
            continue
        properties[name] = {"description": key.doc, **copy.deepcopy(dict(key.schema))}
        if key.required:
            required.append(name)
        else:
            properties[name]["default"] = copy.deepcopy(key.default)
    description = (config_class.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    schema: dict[str, Any] = {"description": description, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _shared_weights_schema() -> dict[str, Any]:
    """Each method allows only the keys its formula reads (TRUNK_METHOD_KEYS); no `method` means the default."""
    schema = _mapping_schema(SharedWeightsConfig)
    default_method = schema["properties"]["method"]["default"]
    rules = []
    for method, keys in TRUNK_METHOD_KEYS.items():
        condition: dict[str, Any] = {"properties": {"method": {"const": method}}}
        if method != default_method:
            condition["required"] = ["method"]
        rules.append({"if": condition, "then": {"propertyNames": {"enum": ["method", *keys]}}})
    schema["allOf"] = rules
    return schema


def _laser_schema(matrix_groups: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """A laser block: its `matrices` are the groups and names of where it sits (an expert's MLP, the base's
    attention), and leaving them out means the first group."""
    schema = _mapping_schema(LaserConfig)
    names = [*matrix_groups, *sorted({name for group in matrix_groups.values() for name in group})]
    matrix = {"enum": names}
    matrices = schema["properties"]["matrices"]
    matrices["anyOf"] = [matrix, {"type": "array", "items": matrix, "minItems": 1}, {"type": "null"}]
    matrices["default"] = [next(iter(matrix_groups))]
    return schema


if __name__ == "__main__":
    sys.stdout.write(config_schema_text())
