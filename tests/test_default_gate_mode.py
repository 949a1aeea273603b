"""A config that names no gate_mode gets fit; one that names a mode gets that mode (issue 28).

mergekit-moe's default is `hidden`; frankenmoe's is `fit`, so the dry run, the model card and the
manifest say which mode ran and why, and a mergekit config that names `hidden` keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.config.constants import AUTO_CONTINUATION_TOKENS, DEFAULT_GATE_MODE
from frankenmoe.config.parse import parse_config
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

DEFAULTED = "fit (the default: the config names no gate_mode)"
EXPERTS = "experts:\n" + "".join(f"  - source_model: e{index}\n    positive_prompts: [x{index}]\n" for index in (0, 1))


def test_a_config_without_gate_mode_gets_fit_with_its_continuations() -> None:
    config = parse_config(f"base_model: b\n{EXPERTS}", "c.yaml")
    assert DEFAULT_GATE_MODE == "fit"
    assert config.gate_mode == "fit" and config.gate_mode_defaulted
    assert config.router.continuation_tokens == AUTO_CONTINUATION_TOKENS["fit"] == 32
    assert config.gate_mode_description == DEFAULTED


def test_a_config_that_names_hidden_keeps_hidden_as_mergekit_configs_do() -> None:
    config = parse_config(f"base_model: b\ngate_mode: hidden\n{EXPERTS}", "c.yaml")
    assert config.gate_mode == "hidden" and not config.gate_mode_defaulted
    assert config.router.continuation_tokens == 0
    assert config.gate_mode_description == "hidden"


def test_dry_run_card_and_manifest_say_which_mode_ran_and_why(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = write_config(tmp_path / "default.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode=None)
    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"gate mode: {DEFAULTED};" in dry.output

    result = run_cli("merge", config, tmp_path / "out", "--no-check")
    assert result.exit_code == 0, result.output
    assert f"| gate mode | {DEFAULTED} |" in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["options"]["gate_mode"] == DEFAULTED


def test_the_default_computes_exactly_the_routers_that_naming_fit_does(tmp_path: Path, tiny_models: TinyModels) -> None:
    routers = {}
    for name, gate_mode in (("default", None), ("named", "fit")):
        config = write_config(tmp_path / f"{name}.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode=gate_mode)
        result = run_cli("merge", config, tmp_path / name, "--no-check")
        assert result.exit_code == 0, result.output
        tensors = load_file(tmp_path / name / "model-00001-of-00001.safetensors")
        routers[name] = {key: value for key, value in tensors.items() if key.endswith("gate.weight")}
    assert routers["default"].keys() == routers["named"].keys() and routers["default"]
    assert all(routers["default"][key].equal(routers["named"][key]) for key in routers["named"])
