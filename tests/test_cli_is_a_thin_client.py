"""The command line is a client of the public API: it imports nothing else of frankenmoe, and `build`
takes every option of `merge` that decides what a merge writes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import typer.main
import yaml

import frankenmoe
from frankenmoe import api
from frankenmoe.cli import app
from tests.conftest import TinyModels
from tests.support import run_cli, write_config
from tests.test_route import PROMPTS, write_hand_routed_mixtral

CLI_PACKAGE = Path(frankenmoe.__file__).parent / "cli"
PUBLIC = {"frankenmoe", "frankenmoe.api", "frankenmoe.errors"}
MERGE_ONLY = {"--dry-run", "--force"}
"""merge's options that do not apply to a batch: build never only plans, and it replaces what it rebuilds."""


def frankenmoe_imports(source: str) -> set[str]:
    """Every frankenmoe module a source file imports, at the top or inside a function, `import x` or `from x import`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "frankenmoe"}


def outside_the_public_api(source: str) -> set[str]:
    return {name for name in frankenmoe_imports(source) if name not in PUBLIC and not name.startswith("frankenmoe.cli")}


def test_the_cli_imports_only_the_public_api_the_errors_and_itself() -> None:
    modules = sorted(CLI_PACKAGE.glob("*.py"))
    assert {module.name for module in modules} >= {"__init__.py", "app.py", "commands.py", "options.py", "render.py"}
    internals = {module.name: outside_the_public_api(module.read_text()) for module in modules}
    assert internals == {module.name: set() for module in modules}


def test_the_import_check_sees_internals_imported_anywhere_in_a_module() -> None:
    source = (
        "from frankenmoe import api\nimport frankenmoe.errors\nfrom frankenmoe.cli.app import say\n"
        "def route():\n    from frankenmoe.analysis.routing import load_checkpoint\n    import frankenmoe.analysis.plot\n"
    )
    assert outside_the_public_api(source) == {"frankenmoe.analysis.routing", "frankenmoe.analysis.plot"}


def option_names(command_name: str) -> set[str]:
    group = typer.main.get_command(app)
    command = group.commands[command_name]  # type: ignore[attr-defined]
    return {name for param in command.params if param.param_type_name == "option" for name in param.opts}


def test_build_accepts_every_option_merge_takes_except_the_single_merge_ones() -> None:
    merge, build = option_names("merge"), option_names("build")
    assert {"--dtype", "--layout", "--seed", "--shard-size", "--format", "--gguf-type", "--stream-sources"} <= merge
    assert merge - MERGE_ONLY - build == set()


def test_the_dry_run_prints_the_plan_the_api_describes(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_models.base, tiny_models.experts[:2])
    out = tmp_path / "out"

    printed = run_cli("merge", config, out, "--dry-run", "--seed", "3")
    described = api.describe_plan(api.plan_merge(config, out, seed=3), detailed=True)

    assert printed.exit_code == 0, printed.output
    assert printed.stdout == "\n".join([*described, "Dry run: nothing was written.", ""])
    assert any(line.startswith("    1  ") and "<-  computed router" in line for line in described)
    assert run_cli("--quiet", "merge", config, out, "--dry-run").stdout == ""


def test_route_from_files_gives_the_command_lines_json(tmp_path: Path) -> None:
    checkpoint = write_hand_routed_mixtral(tmp_path / "moe")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(yaml.safe_dump({0: [PROMPTS[1], PROMPTS[2]]}))

    result = api.route(checkpoint, prompts_file=prompts_file, labels_file=labels_file)
    printed = run_cli("route", checkpoint, "--prompts-file", prompts_file, "--labels", labels_file, "--json")

    assert [routing.prompt.text for routing in result.routings] == list(PROMPTS)  # PROMPTS[1] routed once
    assert [label for _, label in result.labelled] == [0, 0]
    assert json.loads(printed.stdout) == result.to_dict()
    assert result.to_dict()["accuracy"]["prompts"][1] == {
        "text": PROMPTS[2],
        "label": 0,
        "preferred_expert": result.to_dict()["prompts"][2]["preferred_expert"],
    }


def test_route_without_prompts_is_refused_before_reading_the_checkpoint(tmp_path: Path) -> None:
    result = run_cli("route", tmp_path / "missing")

    assert result.exit_code == 2
    assert "No prompts to route. Pass --prompt TEXT (repeatable), --prompts-file FILE or --labels FILE" in result.output
