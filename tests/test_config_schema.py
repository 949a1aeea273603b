"""The config's JSON Schema: generated from the dataclasses' field metadata, shipped, agreeing with the parser
and with the key tables of the docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, ValidationError

from frankenmoe.config import schema as config_module
from frankenmoe.config.constants import TRUNK_METHOD_KEYS, TRUNK_METHODS
from frankenmoe.config.json_schema import SCHEMA_FILE, config_schema, config_schema_text
from frankenmoe.config.parse import parse_config
from frankenmoe.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = config_schema()
VALIDATOR = Draft202012Validator(SCHEMA)

MINIMAL = {
    "base_model": "./base",
    "experts": [
        {"source_model": "./code", "positive_prompts": ["Write a Python function"]},
        {"source_model": "./story", "positive_prompts": ["Once upon a time"]},
    ],
}


def test_shipped_schema_file_is_the_generated_schema() -> None:
    shipped = SCHEMA_FILE.read_text(encoding="utf-8")
    assert shipped == config_schema_text(), (
        "frankenmoe/schema/frankenmoe-config.schema.json is stale: run "
        "`python -m frankenmoe.config.json_schema > frankenmoe/schema/frankenmoe-config.schema.json`"
    )


def test_schema_is_a_valid_draft_2020_12_schema_whose_refs_all_resolve() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    refs = set(re.findall(r'"\$ref": "#/\$defs/(\w+)"', config_schema_text()))
    assert refs == set(SCHEMA["$defs"])


@pytest.mark.parametrize(
    ("definition", "keys"),
    [
        (None, "MERGE_KEYS"),
        ("expert", "EXPERT_KEYS"),
        ("shared_expert", "SHARED_EXPERT_KEYS"),
        ("router", "ROUTER_KEYS"),
        ("shared_weights", "SHARED_WEIGHTS_KEYS"),
        ("expert_laser", "LASER_KEYS"),
        ("base_laser", "LASER_KEYS"),
    ],
)
def test_each_mapping_allows_the_keys_the_parser_allows(definition: str | None, keys: str) -> None:
    schema = SCHEMA if definition is None else SCHEMA["$defs"][definition]
    assert tuple(schema["properties"]) == getattr(config_module, keys)
    assert schema["additionalProperties"] is False


def test_mergekit_lambda_is_the_yaml_name_of_the_shared_weights_scale() -> None:
    assert "lambda" in config_module.SHARED_WEIGHTS_KEYS
    assert "scale" not in config_module.SHARED_WEIGHTS_KEYS
    assert SCHEMA["$defs"]["shared_weights"]["properties"]["lambda"]["default"] == 1.0


def shipped_configs() -> list[Path]:
    return [*sorted((ROOT / "configs").glob("*.yaml")), ROOT / "tests" / "data" / "beyonder-4x7b-v2.yaml"]


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda path: path.name)
def test_schema_accepts_the_shipped_configs(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert [error.message for error in VALIDATOR.iter_errors(data)] == []


def test_schema_accepts_the_every_key_example_of_the_docs() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "config.md").read_text(encoding="utf-8"), re.S)
    full = [yaml.safe_load(block) for block in blocks if "base_laser:" in block]
    assert len(full) == 1
    assert [error.message for error in VALIDATOR.iter_errors(full[0])] == []
    parse_config(yaml.safe_dump(full[0]))  # the parser takes it too


def with_changes(changes: dict[str, Any], expert: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {**MINIMAL, **changes}
    if expert is not None:
        data["experts"] = [{**MINIMAL["experts"][0], **expert}, MINIMAL["experts"][1]]
    return data


def schema_errors(data: Any) -> list[ValidationError]:
    """Every error, with those inside anyOf branches (a nullable block's own errors sit there)."""
    errors = list(VALIDATOR.iter_errors(data))
    for error in errors:
        errors.extend(error.context or ())
    return errors


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (with_changes({"gate_mod": "fit"}), "gate_mod"),
        (with_changes({"experts_per_token": "2"}), "experts_per_token"),
        (with_changes({"dtype": "float8"}), "dtype"),
        (with_changes({"experts": []}), "experts"),
        ({"experts": MINIMAL["experts"]}, "base_model"),
        (with_changes({"base_model": "   "}), "base_model"),
        (with_changes({"router": {"logit_std": 0}}), "logit_std"),
        (with_changes({"router": {"continuation_tokens": 2000}}), "continuation_tokens"),
        (with_changes({"router": {"scale": "big"}}), "scale"),
        (with_changes({"router": None}), "router"),
        (with_changes({"shared_weights": {"method": "linear", "lambda": 2.0}}), "lambda"),
        (with_changes({"shared_weights": {"weights": [1.0, 1.0]}}), "weights"),
        (with_changes({"shared_weights": {"method": "dare_ties", "density": 0}}), "density"),
        (with_changes({"shared_experts": [{"source_model": "./shared", "noise_scale": 0.1}]}), "noise_scale"),
        (with_changes({}, expert={"positve_prompts": ["x"]}), "positve_prompts"),
        (with_changes({}, expert={"positive_prompts": [3]}), "positive_prompts"),
        (with_changes({}, expert={"noise_scale": -1}), "noise_scale"),
        (with_changes({}, expert={"laser": {"method": "snr", "matrices": ["attention"]}}), "matrices"),
        (with_changes({}, expert={"laser": {"method": "snr", "layers": "twenty"}}), "layers"),
        (with_changes({}, expert={"laser": {"matrices": ["mlp"]}}), "method"),
        (with_changes({"base_laser": {"method": "fixed", "keep_fraction": 1.5}}), "keep_fraction"),
    ],
)
def test_schema_and_parser_both_refuse_a_bad_key(data: dict[str, Any], named: str) -> None:
    errors = schema_errors(data)
    assert errors, f"the schema accepts {data}"
    assert any(named in error.json_path or named in error.message for error in errors), [
        (error.json_path, error.message) for error in errors
    ]
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config(yaml.safe_dump(data), "bad.yaml")


def schema_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    return {key: spec["default"] for key, spec in schema["properties"].items() if "default" in spec}


@pytest.mark.parametrize("method", TRUNK_METHODS)
def test_writing_every_schema_default_parses_to_the_config_that_leaving_them_out_gives(method: str) -> None:
    defs = SCHEMA["$defs"]
    # gate_mode is given in both: leaving it out is recorded (gate_mode_defaulted), which the schema cannot say.
    # Each trunk method refuses the keys it does not read, so only those it reads get their defaults written.
    laser = {"method": "snr"}
    sparse = with_changes({"gate_mode": "fit", "shared_weights": {"method": method}}, expert={"laser": laser})
    shared_weights = schema_defaults(defs["shared_weights"])
    full = {
        **schema_defaults(SCHEMA),
        **sparse,
        "router": schema_defaults(defs["router"]),
        "shared_weights": {
            "method": method,
            **{key: shared_weights[key] for key in TRUNK_METHOD_KEYS[method]},
        },
        "experts": [{**schema_defaults(defs["expert"]), **expert} for expert in sparse["experts"]],
    }
    full["experts"][0]["laser"] = {**schema_defaults(defs["expert_laser"]), **laser}
    assert set(full) == set(config_module.MERGE_KEYS)
    assert parse_config(yaml.safe_dump(full)) == parse_config(yaml.safe_dump(sparse))


def docs_table(document: str, heading: str) -> dict[str, str]:
    """The key -> default cell of the first table under `heading` in docs/<document>."""
    lines = (ROOT / "docs" / document).read_text(encoding="utf-8").splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("#") and heading in line)
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table or line.startswith("#"):
            break
    header, rows = table[0], table[2:]
    default = header.index("default")
    return {row[0].strip("`"): row[default] for row in rows}


def documented_default(cell: str) -> Any:
    """`required` for a required key, else the YAML of the cell's first `code` span (or of the cell)."""
    if cell.startswith("required"):
        return "required"
    code = re.search(r"`([^`]*)`", cell)
    return yaml.safe_load(code.group(1) if code else cell)


@pytest.mark.parametrize(
    ("document", "heading", "definition"),
    [
        ("config.md", "Top-level keys", None),
        ("config.md", "Expert entries", "expert"),
        ("gate-modes.md", "Router options", "router"),
    ],
)
def test_docs_key_tables_list_the_schema_keys_with_its_defaults(
    document: str, heading: str, definition: str | None
) -> None:
    schema = SCHEMA if definition is None else SCHEMA["$defs"][definition]
    expected = {
        key: "required" if key in schema.get("required", ()) else spec["default"]
        for key, spec in schema["properties"].items()
    }
    documented = {key: documented_default(cell) for key, cell in docs_table(document, heading).items()}
    assert documented == expected


@pytest.mark.parametrize(
    ("document", "block_key", "definition"),
    [("config.md", "shared_weights", "shared_weights"), ("laser.md", "laser", "expert_laser")],
)
def test_docs_commented_examples_show_every_key_of_their_block(document: str, block_key: str, definition: str) -> None:
    """shared_weights and laser are documented by one commented example each instead of a table."""
    text = (ROOT / "docs" / document).read_text(encoding="utf-8")
    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    blocks = [block for example in examples for block in find_blocks(example, block_key)]
    assert any(tuple(block) == tuple(SCHEMA["$defs"][definition]["properties"]) for block in blocks), blocks


def find_blocks(data: Any, key: str) -> list[dict[str, Any]]:
    """Every mapping under `key`, however deep (a laser block sits inside an expert entry)."""
    if isinstance(data, list):
        return [block for item in data for block in find_blocks(item, key)]
    if not isinstance(data, dict):
        return []
    found = [data[key]] if isinstance(data.get(key), dict) else []
    return found + [block for value in data.values() for block in find_blocks(value, key)]
