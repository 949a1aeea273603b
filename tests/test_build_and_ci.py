"""`frankenmoe build`, `verify` and the CI-facing options: skipping up-to-date outputs, rebuilding exactly
what changed, failures that do not stop a batch, JSON logs, --quiet, and the examples/ci Makefile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TinyModels
from tests.support import run_cli

ROOT = Path(__file__).resolve().parents[1]


def write_variant(path: Path, base: Path, experts: list[Path]) -> Path:
    data = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": str(expert)} for expert in experts],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def batch(tmp_path: Path, tiny_models: TinyModels) -> tuple[Path, list[Path]]:
    models = tmp_path / "models"
    shutil.copytree(tiny_models.base, models / "base")
    for index, expert in enumerate(tiny_models.experts):
        shutil.copytree(expert, models / f"expert{index}")
    experts = [models / f"expert{index}" for index in range(3)]
    configs = [
        write_variant(tmp_path / "two.yaml", models / "base", experts[:2]),
        write_variant(tmp_path / "three.yaml", models / "base", experts),
    ]
    return tmp_path / "builds", configs


def build(out_dir: Path, configs: list[Path], *options: str) -> tuple[int, dict, str]:
    summary = out_dir.parent / "summary.json"
    result = run_cli("build", *configs, "--out-dir", out_dir, "--json", summary, "--no-check", *options)
    return result.exit_code, json.loads(summary.read_text()), result.output


def statuses(summary: dict) -> dict[str, str]:
    return {Path(outcome["config"]).name: outcome["status"] for outcome in summary["outcomes"]}


def test_a_second_build_of_the_same_configs_does_nothing_and_says_so(batch: tuple[Path, list[Path]]) -> None:
    out_dir, configs = batch
    assert build(out_dir, configs)[0] == 0
    first = {path.name: path.stat().st_mtime_ns for path in (out_dir / "two").iterdir()}

    code, summary, output = build(out_dir, configs)

    assert code == 0 and statuses(summary) == {"two.yaml": "up to date", "three.yaml": "up to date"}
    assert "built 0, up to date 2, failed 0" in output
    assert {path.name: path.stat().st_mtime_ns for path in (out_dir / "two").iterdir()} == first


def test_touching_a_config_rebuilds_only_its_output(batch: tuple[Path, list[Path]]) -> None:
    out_dir, configs = batch
    build(out_dir, configs)
    data = yaml.safe_load(configs[1].read_text())
    data["experts"][0]["noise_scale"] = 0.01
    configs[1].write_text(yaml.safe_dump(data))

    code, summary, _ = build(out_dir, configs)

    assert code == 0 and statuses(summary) == {"two.yaml": "up to date", "three.yaml": "built"}
    assert summary["outcomes"][1]["reason"] == "the config changed"


def test_reformatting_a_config_without_changing_its_data_keeps_it_up_to_date(batch: tuple[Path, list[Path]]) -> None:
    out_dir, configs = batch
    build(out_dir, configs)
    configs[0].write_text("# a comment\n" + yaml.safe_dump(yaml.safe_load(configs[0].read_text()), sort_keys=True))

    assert statuses(build(out_dir, configs)[1])["two.yaml"] == "up to date"


def test_replacing_a_source_weight_file_rebuilds_exactly_the_outputs_that_read_it(
    batch: tuple[Path, list[Path]], tiny_models: TinyModels
) -> None:
    out_dir, configs = batch
    build(out_dir, configs)
    expert2 = Path(yaml.safe_load(configs[1].read_text())["experts"][2]["source_model"])
    shutil.copyfile(tiny_models.experts[0] / "model.safetensors", expert2 / "model.safetensors")

    code, summary, _ = build(out_dir, configs)

    assert code == 0 and statuses(summary) == {"two.yaml": "up to date", "three.yaml": "built"}
    assert summary["outcomes"][1]["reason"] == "a source model's files changed"


def test_a_failing_config_does_not_stop_the_others_and_the_summary_says_why(
    batch: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    out_dir, configs = batch
    broken = write_variant(tmp_path / "broken.yaml", tmp_path / "no-such-model", [tmp_path / "no-such-model"])

    code, summary, output = build(out_dir, [broken, *configs])

    assert code == 3
    assert statuses(summary) == {"broken.yaml": "failed", "two.yaml": "built", "three.yaml": "built"}
    failure = summary["outcomes"][0]
    assert failure["exit_code"] == 3 and failure["reason"].startswith("model error: Model folder")
    assert summary["counts"] == {"built": 2, "up to date": 0, "failed": 1, "interrupted": 0, "skipped": 0}
    assert summary["exit_code"] == 3
    assert "built 2, up to date 0, failed 1" in output


def test_fail_fast_stops_at_the_first_failure(batch: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out_dir, configs = batch
    broken = write_variant(tmp_path / "broken.yaml", tmp_path / "no-such-model", [tmp_path / "no-such-model"])

    code, summary, _ = build(out_dir, [broken, *configs], "--fail-fast")

    assert code == 3 and statuses(summary) == {"broken.yaml": "failed"}
    assert not (out_dir / "two").exists()


def test_verify_exits_0_on_an_intact_output_and_5_with_every_difference_named(batch: tuple[Path, list[Path]]) -> None:
    out_dir, configs = batch
    build(out_dir, configs)
    intact = run_cli("verify", out_dir / "two", "--json")
    assert intact.exit_code == 0 and json.loads(intact.output)["ok"] is True

    (out_dir / "two" / "README.md").write_text("edited")
    changed = run_cli("verify", out_dir / "two")
    assert changed.exit_code == 5
    assert "differs: README.md:" in changed.output


def test_quiet_merge_prints_nothing_and_json_logs_are_one_object_per_line(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    config = write_variant(tmp_path / "moe.yaml", tiny_models.base, list(tiny_models.experts[:2]))
    quiet = subprocess.run(
        [sys.executable, "-m", "frankenmoe", "--quiet", "merge", str(config), str(tmp_path / "q"), "--no-check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""

    logged = subprocess.run(
        [sys.executable, "-m", "frankenmoe", "--log-format", "json", "merge", str(config), str(tmp_path / "j")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert logged.returncode == 0, logged.stderr
    events = [json.loads(line) for line in logged.stderr.splitlines()]
    finished = {event["stage"] for event in events if event["event"] == "stage" and event["status"] == "finished"}
    assert {"planning", "writing", "verifying", "routing_check"} <= finished
    assert all("seconds" in event for event in events if event.get("status") == "finished")

    refused = subprocess.run(
        [sys.executable, "-m", "frankenmoe", "--log-format", "json", "merge", str(config), str(tmp_path / "j")],
        capture_output=True,
        text=True,
        check=False,
    )
    error = json.loads(refused.stderr.splitlines()[-1])
    assert refused.returncode == 4 and error["event"] == "error" and error["exit_code"] == 4


@pytest.mark.slow  # merges of models made three times larger, or a 500 MB pickle: seconds each
def test_the_ci_makefile_example_builds_and_verifies_both_variants_then_skips_them(
    batch: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, configs = batch
    out = tmp_path / "ci-out"
    command = [
        "make",
        "-f",
        "examples/ci/Makefile",
        f"PYTHON={sys.executable}",
        f"CONFIGS={' '.join(map(str, configs))}",
        f"OUT={out}",
    ]

    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "two: intact" in first.stdout and "three: intact" in first.stdout
    summary = json.loads((out / "build-summary.json").read_text())
    assert summary["counts"] == {"built": 2, "up to date": 0, "failed": 0, "interrupted": 0, "skipped": 0}

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads((out / "build-summary.json").read_text())["counts"]["up to date"] == 2


class ExitCalledError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@pytest.mark.parametrize(
    ("arguments", "code", "printed"),
    [
        (["--version"], 0, "frankenmoe "),
        (["merge", "missing.yaml", "out"], 2, "Config file missing.yaml does not exist"),
        (["no-such-command"], 2, "No such command"),
    ],
)
def test_the_command_ends_the_process_with_the_cli_exit_code_after_flushing_its_output(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    arguments: list[str],
    code: int,
    printed: str,
) -> None:
    from frankenmoe import cli

    def end_process(status: int) -> None:
        raise ExitCalledError(status)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["frankenmoe", *arguments])
    monkeypatch.setattr(cli.os, "_exit", end_process)
    with pytest.raises(ExitCalledError) as ended:
        cli.console_main()
    assert ended.value.code == code
    output = capfd.readouterr()
    assert printed in output.out + output.err
