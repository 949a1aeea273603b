"""OUT is always the previous checkpoint, absent, or complete: refusals, disk space, kill -9 and Ctrl-C.

Signals go to a real `frankenmoe merge` subprocess. To reach "during the hidden-state pass" and
"during writing" deterministically, the subprocess runs a small driver script that wraps one
frankenmoe function to touch a marker file and sleep; the test waits for the marker, then signals.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from frankenmoe.checkpoint.output_recovery import OWNER_FILE
from frankenmoe.checkpoint.output_rules import partial_folder, replaced_folder
from frankenmoe.io import shards as tensor_io
from frankenmoe.io.safetensors import read_header
from frankenmoe.merging import run as merge
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

IO_ERROR, INTERRUPTED = 4, 130
SHARD = "model-00001-of-00001.safetensors"
CHECKPOINT_FILES = {
    SHARD,
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "README.md",
    "frankenmoe-manifest.json",
}
SIGNAL_WAIT_SECONDS = 120

DRIVER = """
import signal, sys, time
from pathlib import Path

marker, stage, arguments = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
# A terminal delivers Ctrl-C as KeyboardInterrupt; make sure an inherited "ignore SIGINT" cannot hide it.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pause_after(function):
    def paused(*args, **kwargs):
        result = function(*args, **kwargs)
        marker.touch()
        # Short sleeps, as a real computation's short steps: a cancelled router thread stops between two.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return result
    return paused


if stage == "writing":
    from frankenmoe.io.shards import ShardWriter
    ShardWriter.copy_bytes = pause_after(ShardWriter.copy_bytes)
else:
    from frankenmoe.decoder.decoder import StreamedDecoder
    StreamedDecoder.load_attention = pause_after(StreamedDecoder.load_attention)

from frankenmoe.cli import app
app(arguments, prog_name="frankenmoe")
"""


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash: equal fingerprints mean an untouched folder."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def siblings(out: Path) -> set[str]:
    return {path.name for path in out.parent.iterdir()}


@pytest.fixture(scope="module")
def previous_checkpoint(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished checkpoint from a first merge; tests copy it to play the OUT a new merge must not damage."""
    root = tmp_path_factory.mktemp("previous")
    config = write_config(root / "moe.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    result = run_cli("merge", config, root / "out")
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def existing_out(previous_checkpoint: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)
    return out


def three_expert_config(tmp_path: Path, tiny_models: TinyModels, gate_mode: str = "random") -> Path:
    """A different merge than `previous_checkpoint`'s; random gates unless a test needs the hidden-state pass."""
    return write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode=gate_mode)


# --- dangerous targets --------------------------------------------------------------------------------------------


def refused_before_work(config: Path, out: Path, *fragments: str, force: bool = False) -> str:
    """Run a merge that must be refused with an I/O error; return its one-line message."""
    result = run_cli("merge", config, out, *(["--force"] if force else []))
    assert result.exit_code == IO_ERROR, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("I/O error: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not partial_folder(out).exists()
    return message


def test_out_equal_to_a_source_folder_is_refused_even_with_force(tmp_path: Path, tiny_models: TinyModels) -> None:
    before = fingerprint(tiny_models.experts[1])
    config = three_expert_config(tmp_path, tiny_models)
    refused_before_work(config, tiny_models.experts[1], "is the source model folder", force=True)
    assert fingerprint(tiny_models.experts[1]) == before


def test_out_inside_a_source_folder_is_refused(tmp_path: Path, tiny_models: TinyModels) -> None:
    before = fingerprint(tiny_models.base)
    config = three_expert_config(tmp_path, tiny_models)
    out = tiny_models.base / "moe"
    refused_before_work(config, out, f"is inside source model folder {tiny_models.base}", force=True)
    assert not out.exists()
    assert fingerprint(tiny_models.base) == before


def test_out_containing_a_source_is_refused_with_force(tmp_path: Path, tiny_models: TinyModels) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models.experts[0], models / "expert")
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [models / "expert", tiny_models.experts[1]])
    refused_before_work(config, models, "replacing it would delete that model", force=True)
    assert (models / "expert" / "model.safetensors").is_file()


def test_non_empty_out_without_force_is_refused_and_untouched(
    tmp_path: Path, tiny_models: TinyModels, existing_out: Path
) -> None:
    before = fingerprint(existing_out)
    refused_before_work(
        three_expert_config(tmp_path, tiny_models), existing_out, "already holds a checkpoint", "Pass --force"
    )
    assert fingerprint(existing_out) == before


def test_force_replaces_out_with_a_complete_checkpoint_and_leaves_no_temporary_folder(
    tmp_path: Path, tiny_models: TinyModels, existing_out: Path
) -> None:
    before = fingerprint(existing_out)
    result = run_cli("merge", three_expert_config(tmp_path, tiny_models), existing_out, "--force")
    assert result.exit_code == 0, result.output
    assert fingerprint(existing_out) != before
    assert {path.name for path in existing_out.iterdir()} == CHECKPOINT_FILES
    assert len([name for name in read_header(existing_out / SHARD) if ".experts.2." in name]) == 6
    assert siblings(existing_out) == {"out", "moe.yaml"}


def test_paths_in_the_config_never_cause_writes_outside_out(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative = [os.path.relpath(folder, work) for folder in (tiny_models.base, *tiny_models.experts)]
    assert all(path.startswith("..") for path in relative)
    config = write_config(work / "moe.yaml", relative[0], relative[1:], gate_mode="random")
    models_root = tiny_models.base.parent
    models_before, work_before = fingerprint(models_root), fingerprint(tmp_path)
    result = run_cli("merge", "moe.yaml", "out")
    assert result.exit_code == 0, result.output
    assert fingerprint(models_root) == models_before
    assert {name: digest for name, digest in fingerprint(tmp_path).items() if not name.startswith("work/out/")} == (
        work_before
    )
    assert {path.name for path in (work / "out").iterdir()} == CHECKPOINT_FILES
    assert config.is_file()


# --- disk space ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 40 MB tmpfs when this process may mount one (root); otherwise a plain folder and False."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    mounted = (
        mount is not None
        and subprocess.run([mount, "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True).returncode
        == 0
    )
    try:
        yield disk, mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def fill_disk(disk: Path, leave_bytes: int) -> None:
    chunk = b"\0" * (1024 * 1024)
    with (disk / "filler").open("wb") as handle:
        while shutil.disk_usage(disk).free > leave_bytes + len(chunk):
            handle.write(chunk)
            handle.flush()


def test_checkpoint_larger_than_free_space_is_refused_with_both_numbers(
    tmp_path: Path,
    tiny_models: TinyModels,
    previous_checkpoint: Path,
    small_disk: tuple[Path, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk, mounted = small_disk
    if mounted:
        fill_disk(disk, leave_bytes=5 * 1024 * 1024)
    else:
        fake_usage = shutil.disk_usage(tmp_path)._replace(free=5 * 1024 * 1024)
        monkeypatch.setattr("frankenmoe.checkpoint.output_folder.shutil.disk_usage", lambda _path: fake_usage)
    free = shutil.disk_usage(disk).free if mounted else 5 * 1024 * 1024
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts[:2])
    message = refused_before_work(config, disk / "out", "Not enough disk space", f"({free} bytes) free")
    needed = int(re.search(r"needs [\d.]+ MB \((\d+) bytes", message).group(1))
    assert needed == sum(location.nbytes for location in read_header(previous_checkpoint / SHARD).values())
    assert not (disk / "out").exists()


def test_disk_filling_up_during_the_write_removes_the_partial_output(
    tmp_path: Path,
    tiny_models: TinyModels,
    small_disk: tuple[Path, bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk, mounted = small_disk
    if mounted:
        # The space check passes; then "another program" takes the space before the first shard is written.
        original = merge.write_checkpoint

        def fill_disk_then_write(*args, **kwargs):
            fill_disk(disk, leave_bytes=1024 * 1024)
            return original(*args, **kwargs)

        monkeypatch.setattr(merge, "write_checkpoint", fill_disk_then_write)
    else:

        def disk_full(_descriptor: int, _data: memoryview) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(tensor_io, "_write_all", disk_full)
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    result = run_cli("merge", config, disk / "out")
    assert result.exit_code == IO_ERROR, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("I/O error: The disk is full: writing ")
    assert "The partial output was removed" in message
    assert siblings(disk / "out") <= {"filler", "lost+found"}


def test_an_fsync_failure_while_the_next_shard_is_written_fails_the_merge_and_leaves_no_output(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards are fsynced on a thread of their own while the next shard is written; its error must
    # still end the merge, with no output.
    def failing_fsync(_descriptor: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(tensor_io.os, "fsync", failing_fsync)
    result = run_cli("merge", three_expert_config(tmp_path, tiny_models), tmp_path / "out", "--shard-size", "1MB")
    assert result.exit_code == IO_ERROR, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert re.search(r"Writing .*model-00001-of-\d{5}\.safetensors failed: Input/output error", message), message
    assert siblings(tmp_path / "out") == {"moe.yaml"}


# --- stale and concurrent temporary folders -------------------------------------------------------------------------


def test_partial_folder_of_a_running_merge_is_refused_even_with_force(tmp_path: Path, tiny_models: TinyModels) -> None:
    out = tmp_path / "out"
    partial = partial_folder(out)
    partial.mkdir()
    (partial / OWNER_FILE).write_text(str(os.getppid()))
    result = run_cli("merge", three_expert_config(tmp_path, tiny_models), out, "--force")
    assert result.exit_code == IO_ERROR, result.output
    assert f"Another frankenmoe merge (process {os.getppid()}) is writing {out}" in result.stderr
    assert (partial / OWNER_FILE).is_file()
    assert not out.exists()


def test_previous_checkpoint_moved_aside_by_a_killed_swap_is_put_back_by_the_next_run(
    tmp_path: Path, tiny_models: TinyModels, existing_out: Path
) -> None:
    before = fingerprint(existing_out)
    existing_out.rename(replaced_folder(existing_out))
    # Put back (no staged checkpoint to finish the swap with), then the usual refusal of a merge without --force.
    refused_before_work(three_expert_config(tmp_path, tiny_models), existing_out, "already holds a checkpoint")
    assert fingerprint(existing_out) == before
    assert not replaced_folder(existing_out).exists()


# --- kill -9 and Ctrl-C ---------------------------------------------------------------------------------------------


def start_paused_merge(tmp_path: Path, stage: str, config: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start `frankenmoe merge --force` in a subprocess and wait until it pauses at `stage`."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / f"paused-{stage}"
    process = subprocess.Popen(
        [sys.executable, str(driver), str(marker), stage, "merge", str(config), str(out), "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + SIGNAL_WAIT_SECONDS
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output, errors = process.communicate()
            pytest.fail(f"the merge never reached {stage}: exit {process.returncode}\n{output}\n{errors}")
        time.sleep(0.05)
    return process, marker


def test_kill_9_while_writing_leaves_previous_out_intact_then_the_stale_folder_is_removed_by_the_next_run(
    tmp_path: Path, tiny_models: TinyModels, existing_out: Path
) -> None:
    before = fingerprint(existing_out)
    config = three_expert_config(tmp_path, tiny_models)
    process, _ = start_paused_merge(tmp_path, "writing", config, existing_out)
    partial = partial_folder(existing_out)
    assert (partial / SHARD).is_file()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=SIGNAL_WAIT_SECONDS)
    assert process.returncode == -signal.SIGKILL
    assert fingerprint(existing_out) == before
    assert partial.is_dir()

    stale = run_cli("merge", config, existing_out)
    assert stale.exit_code == IO_ERROR  # OUT holds a checkpoint and there is no --force
    assert f"Removed {partial}: the staging folder of an earlier merge" in stale.stderr
    assert not partial.exists()
    assert fingerprint(existing_out) == before

    forced = run_cli("merge", config, existing_out, "--force")
    assert forced.exit_code == 0, forced.output
    assert not partial.exists()
    assert {path.name for path in existing_out.iterdir()} == CHECKPOINT_FILES
    assert fingerprint(existing_out) != before


@pytest.mark.parametrize("stage", ["hidden-state pass", "writing"])
def test_ctrl_c_exits_130_removes_partial_output_and_keeps_previous_out(
    tmp_path: Path, tiny_models: TinyModels, existing_out: Path, stage: str
) -> None:
    before = fingerprint(existing_out)
    config = three_expert_config(tmp_path, tiny_models, gate_mode="hidden")
    process, _ = start_paused_merge(tmp_path, stage, config, existing_out)
    # The router computation overlaps writing, so the staging folder exists in both stages.
    assert partial_folder(existing_out).is_dir()
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=SIGNAL_WAIT_SECONDS)
    assert process.returncode == INTERRUPTED, errors
    assert "Traceback" not in errors
    assert errors.strip().splitlines()[-1].startswith("interrupted: Interrupted by Ctrl-C.")
    assert fingerprint(existing_out) == before
    assert siblings(existing_out) == {"out", "moe.yaml", "driver.py", f"paused-{stage}"}
