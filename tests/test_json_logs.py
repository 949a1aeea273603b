"""`--log-format json`: every stderr line is one JSON object, whatever goes wrong (usage errors, bugs,
verify's differences, a late signal); and the common options work before and after the command name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import frankenmoe
import frankenmoe.api
from frankenmoe.cli import app
from frankenmoe.runtime.interrupts import mark_committed
from tests.conftest import TinyModels
from tests.support import write_config

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object (json.loads fails the test on any line that is not one)."""
    lines = stderr.splitlines()
    assert lines, "nothing was written to stderr"
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def damaged_output(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged checkpoint with one byte of its shard flipped: verify finds differences (exit 5)."""
    data = {
        "base_model": str(tiny_models.base),
        "gate_mode": "random",
        "experts": [{"source_model": str(expert)} for expert in tiny_models.experts[:2]],
    }
    out = frankenmoe.merge(data, tmp_path_factory.mktemp("json-logs") / "out", check_routing=False).out
    shard = out / "model-00001-of-00001.safetensors"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[-1] ^= 0xFF
    shard.write_bytes(bytes(data_bytes))
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["--log-format", "json", "merge"],
        ["--log-format", "json", "merge", "a.yaml", "out", "--bogus"],
        ["--log-format", "json", "no-such-command"],
        ["--bogus", "--log-format", "json", "verify", "out"],
        ["merge", "a.yaml", "out", "--seed", "x", "--log-format=json"],
    ],
)
def test_a_usage_error_is_one_json_error_event_with_exit_2(args: list[str]) -> None:
    result = invoke(*args)

    assert result.exit_code == 2
    (error,) = events(result.stderr)
    assert error["event"] == "error" and error["kind"] == "usage error" and error["exit_code"] == 2
    assert "--help` for the usage." in error["message"]


def test_an_unexpected_exception_is_an_error_event_with_exit_1_and_its_traceback_only_in_a_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(checkpoint: Path) -> None:
        raise RuntimeError("a bug deep inside")

    monkeypatch.setattr(frankenmoe.api, "verify", broken)

    plain = invoke("--log-format", "json", "verify", tmp_path)
    verbose = invoke("--log-format", "json", "verify", tmp_path, "--verbose")

    for result in (plain, verbose):
        error = events(result.stderr)[-1]
        assert result.exit_code == 1
        assert (error["event"], error["kind"], error["exit_code"]) == ("error", "internal error", 1)
        assert "RuntimeError" in error["message"] and "a bug deep inside" in error["message"]
    assert "traceback" not in events(plain.stderr)[-1]
    assert "RuntimeError: a bug deep inside" in events(verbose.stderr)[-1]["traceback"]


def test_a_known_errors_traceback_under_verbose_goes_inside_the_error_event(tmp_path: Path) -> None:
    result = invoke("--log-format", "json", "verify", tmp_path / "missing", "--verbose")

    error = events(result.stderr)[-1]
    assert result.exit_code == error["exit_code"] != 0
    assert error["traceback"].startswith("Traceback (most recent call last)")


def test_verify_differences_are_json_difference_events(damaged_output: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "frankenmoe", "--log-format", "json", "verify", str(damaged_output)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )

    assert result.returncode == 5
    differences = [event for event in events(result.stderr) if event["event"] == "difference"]
    assert differences and any("model-00001-of-00001.safetensors" in event["message"] for event in differences)


def test_the_late_signal_note_is_a_json_note_event(monkeypatch: pytest.MonkeyPatch, damaged_output: Path) -> None:
    real_verify = frankenmoe.api.verify

    def verify_then_signal(checkpoint: Path) -> Any:
        report = real_verify(checkpoint)
        mark_committed()  # what a merge does once its checkpoint is in place; the signal is then held
        os.kill(os.getpid(), signal.SIGTERM)
        return report

    monkeypatch.setattr(frankenmoe.api, "verify", verify_then_signal)

    result = invoke("--log-format", "json", "verify", damaged_output)

    assert result.exit_code == 5
    notes = [event for event in events(result.stderr) if event["event"] == "note"]
    assert [note["message"] for note in notes] == [
        "SIGTERM arrived after the new checkpoint was in place; the merge had already completed."
    ]


@pytest.fixture
def config(tmp_path: Path, tiny_models: TinyModels) -> Path:
    return write_config(tmp_path / "two.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")


@pytest.mark.parametrize(
    "args",
    [
        ["--quiet", "merge", "{config}", "{out}", "--dry-run"],
        ["merge", "{config}", "{out}", "--dry-run", "--quiet"],
        ["merge", "{config}", "{out}", "-q", "--dry-run"],
    ],
)
def test_quiet_works_before_and_after_the_command_name(config: Path, tmp_path: Path, args: list[str]) -> None:
    loud = invoke("merge", config, tmp_path / "out", "--dry-run")
    quiet = invoke(*(arg.format(config=config, out=tmp_path / "out") for arg in args))

    assert (loud.exit_code, quiet.exit_code) == (0, 0)
    assert "Dry run: nothing was written." in loud.stdout and quiet.stdout == ""


def test_log_format_after_and_verbose_before_the_command_name(config: Path, tmp_path: Path) -> None:
    result = invoke("-v", "merge", config, tmp_path / "out", "--dry-run", "--log-format", "json")

    assert result.exit_code == 0
    stages = [(event["stage"], event["status"]) for event in events(result.stderr) if event["event"] == "stage"]
    assert stages == [("planning", "started"), ("planning", "finished")]


def test_an_option_value_that_looks_like_a_common_option_stays_the_options_value(config: Path, tmp_path: Path) -> None:
    result = invoke("merge", config, tmp_path / "out", "--dry-run", "--shard-size", "-q")

    assert result.exit_code == 2
    assert "Shard size '-q' is not a size" in result.stderr
