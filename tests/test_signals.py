"""Ctrl-C and SIGTERM at the moments that went wrong: start-up, router thread busy, writing, just after the swap.

Each test runs `frankenmoe merge` in a subprocess through a driver script that pauses the merge at one
moment and touches a marker file there; the test waits for the marker, then sends the signal. A pause
in the main thread ends when the signal has arrived (the driver watches Python's signal wake-up fd), so
no test depends on how long anything takes. The router-thread pause is busy torch work, as a real
hidden-state pass is, because an idle thread does not show the abort that a computing one causes.
Also here: `--version` and `--help` import none of the heavy modules, and what a signal during the
swap means in-process, for a command and for library use.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frankenmoe.checkpoint.output_folder import staged_output
from frankenmoe.checkpoint.output_rules import not_a_checkpoint_reason, partial_folder
from frankenmoe.runtime.interrupts import interrupt_scope
from tests.conftest import TinyModels
from tests.support import write_config

INTERRUPTED, TERMINATED = 130, 143
WAIT_SECONDS = 120

DRIVER = """
import contextlib, os, select, signal, sys, time
from pathlib import Path

markers, stages, arguments = Path(sys.argv[1]), sys.argv[2].split("+"), sys.argv[3:]
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C, whatever the parent ignores
wake_read, wake_write = os.pipe()
os.set_blocking(wake_write, False)
signal.set_wakeup_fd(wake_write)  # every signal Python catches writes a byte here


def pause(stage):
    (markers / stage).touch()
    select.select([wake_read], [], [], 300)


if "startup" in stages:
    class PauseOnTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                pause("startup")
            return None

    sys.meta_path.insert(0, PauseOnTorchImport())

if "routers" in stages:
    import torch
    from frankenmoe.merging import stages as merge_stages

    compute_gates = merge_stages.compute_gates

    def busy_then_compute(*args):
        (markers / "routers").touch()
        rows = torch.rand(64, 64)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = torch.tanh(rows @ rows)
        return compute_gates(*args)

    merge_stages.compute_gates = busy_then_compute

if "writing" in stages:
    from frankenmoe.io.shards import ShardWriter

    copy_bytes = ShardWriter.copy_bytes

    def copy_then_pause(self, location):
        copy_bytes(self, location)
        if not (markers / "writing").exists():
            pause("writing")

    ShardWriter.copy_bytes = copy_then_pause

if "swapped" in stages:
    from frankenmoe.merging import run as pipeline

    staged_output = pipeline.staged_output

    @contextlib.contextmanager
    def staged_then_pause(*args, **kwargs):
        with staged_output(*args, **kwargs) as staging:
            yield staging
        pause("swapped")

    pipeline.staged_output = staged_then_pause

from frankenmoe.cli import app

app(arguments, prog_name="frankenmoe")
"""


def run_until(
    tmp_path: Path, stages: str, arguments: list[str | Path], send: signal.Signals
) -> subprocess.CompletedProcess[str]:
    """Run the CLI through the driver, wait until every stage in `stages` is reached, send `send`, wait for exit."""
    driver, markers = tmp_path / "driver.py", tmp_path / "markers"
    driver.write_text(DRIVER)
    markers.mkdir()
    command = [sys.executable, str(driver), str(markers), stages, *map(str, arguments)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + WAIT_SECONDS
    while not all((markers / stage).exists() for stage in stages.split("+")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output, errors = process.communicate()
            pytest.fail(f"the run never reached {stages}: exit {process.returncode}\n{output}\n{errors}")
        time.sleep(0.02)
    process.send_signal(send)
    try:
        output, errors = process.communicate(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        output, errors = process.communicate()
        pytest.fail(f"the run did not exit after {send.name}\n{output}\n{errors}")
    return subprocess.CompletedProcess(command, process.returncode, output, errors)


def merge_arguments(tmp_path: Path, tiny_models: TinyModels) -> list[str | Path]:
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    return ["merge", config, tmp_path / "out", "--no-check"]


def assert_stopped_cleanly(result: subprocess.CompletedProcess[str], code: int, tmp_path: Path) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "terminate called" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: ")
    assert "Any partial output was removed" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["driver.py", "markers", "moe.yaml"]


def test_ctrl_c_while_the_router_thread_computes_exits_130(tmp_path: Path, tiny_models: TinyModels) -> None:
    result = run_until(tmp_path, "routers", merge_arguments(tmp_path, tiny_models), signal.SIGINT)
    assert_stopped_cleanly(result, INTERRUPTED, tmp_path)
    assert "Interrupted by Ctrl-C" in result.stderr


def test_sigterm_while_writing_cleans_up_like_ctrl_c_and_exits_143(tmp_path: Path, tiny_models: TinyModels) -> None:
    # The router thread is busy too: it must be stopped on the way out, not left running into interpreter shutdown.
    result = run_until(tmp_path, "routers+writing", merge_arguments(tmp_path, tiny_models), signal.SIGTERM)
    assert_stopped_cleanly(result, TERMINATED, tmp_path)
    assert "Stopped by SIGTERM" in result.stderr


@pytest.mark.parametrize("send", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_just_after_the_swap_is_a_success(
    tmp_path: Path, tiny_models: TinyModels, send: signal.Signals
) -> None:
    result = run_until(tmp_path, "swapped", merge_arguments(tmp_path, tiny_models), send)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Wrote " in result.stdout
    assert "the merge had already completed" in result.stderr
    assert not_a_checkpoint_reason(tmp_path / "out") is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["driver.py", "markers", "moe.yaml", "out"]


def test_ctrl_c_during_start_up_is_an_interruption_not_a_traceback(tmp_path: Path, tiny_models: TinyModels) -> None:
    result = run_until(tmp_path, "startup", merge_arguments(tmp_path, tiny_models), signal.SIGINT)
    assert_stopped_cleanly(result, INTERRUPTED, tmp_path)


@pytest.mark.parametrize("arguments", [["--version"], ["--help"], ["merge", "--help"]])
def test_version_and_help_import_no_heavy_module(arguments: list[str]) -> None:
    probe = (
        "import sys\n"
        "from frankenmoe.cli import app\n"
        "try:\n"
        f"    app({arguments!r}, prog_name='frankenmoe')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "heavy = ('torch', 'transformers', 'safetensors', 'numpy', 'tqdm', 'frankenmoe.merging.run', 'frankenmoe.api')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- a signal during the swap, in-process -------------------------------------------------------------------------


@pytest.mark.usefixtures("ctrl_c_during_the_swap")
def test_in_a_command_a_signal_during_the_swap_is_reported_not_raised(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with interrupt_scope() as signals_after_commit:
        with staged_output(out) as staging:
            (staging / "config.json").write_text("{}")
        assert signals_after_commit() == [signal.SIGINT]
    assert (out / "config.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("ctrl_c_during_the_swap")
def test_in_library_use_a_signal_during_the_swap_is_delivered_once_the_checkpoint_is_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_output(out) as staging:
        (staging / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert not partial_folder(out).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
