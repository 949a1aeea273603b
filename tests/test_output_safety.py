"""What a merge may replace: only a checkpoint a previous merge wrote, checked at the start and again at the swap.

Also the dry run's writability check and staging-folder names that stay within the file-name limit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from frankenmoe.checkpoint.output_rules import NAME_MAX, not_a_checkpoint_reason, partial_folder, replaced_folder
from frankenmoe.merging import run as pipeline
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

IO_ERROR = 4
SHARD = "model-00001-of-00001.safetensors"


def fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def previous_checkpoint(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint a first merge wrote; tests copy it to play an OUT that a later merge may replace."""
    root = tmp_path_factory.mktemp("previous")
    config = write_config(root / "moe.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    result = run_cli("merge", config, root / "out", "--no-check")
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def config(tmp_path: Path, tiny_models: TinyModels) -> Path:
    """A merge different from `previous_checkpoint`'s (three experts), random gates to keep it fast."""
    return write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")


def refusal(*args: str | Path) -> str:
    """Run a merge that must be refused with an I/O error; return its message."""
    result = run_cli("merge", *args, "--no-check")
    assert result.exit_code == IO_ERROR, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("I/O error: ")
    return message


# --- what --force may replace ----------------------------------------------------------------------------------


def test_a_previous_merge_output_is_recognised_as_a_checkpoint(previous_checkpoint: Path) -> None:
    assert not_a_checkpoint_reason(previous_checkpoint) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt"),
        (lambda out: (out / "runs").mkdir(), "runs"),
        (lambda out: (out / "README.md").write_text("# my model\n"), "model card"),
        (lambda out: (out / "README.md").unlink(), "model card"),
        (lambda out: (out / "config.json").unlink(), "config.json"),
        (lambda out: (out / SHARD).unlink(), "safetensors"),
    ],
    ids=["extra-file", "extra-folder", "foreign-card", "no-card", "no-config", "no-weights"],
)
def test_anything_but_an_untouched_merge_output_is_not_a_checkpoint(
    previous_checkpoint: Path, tmp_path: Path, change: Callable[[Path], object], reason: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)
    change(out)
    assert reason in (not_a_checkpoint_reason(out) or "")


def test_force_refuses_a_folder_of_other_files_and_leaves_it_untouched(tmp_path: Path, config: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("three weeks of notes")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    before = fingerprint(out)
    message = refusal(config, out, "--force")
    assert "is not a checkpoint a frankenmoe merge wrote" in message
    assert "notes.txt" in message
    assert fingerprint(out) == before


def test_not_empty_refusal_suggests_force_only_for_a_checkpoint(
    tmp_path: Path, config: Path, previous_checkpoint: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "Pass --force" not in refusal(config, other)
    checkpoint = tmp_path / "out"
    shutil.copytree(previous_checkpoint, checkpoint)
    assert "Pass --force to replace it" in refusal(config, checkpoint)


def test_force_in_the_folder_holding_the_config_is_refused(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`frankenmoe merge cfg.yaml . --force`, the command that deleted a user's folder."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "cfg.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    (tmp_path / "notes.txt").write_text("mine")
    before = fingerprint(tmp_path)
    message = refusal("cfg.yaml", ".", "--force")
    assert "holds the merge config" in message
    assert fingerprint(tmp_path) == before


def test_a_checkpoint_that_holds_the_config_is_never_replaced(
    tmp_path: Path, tiny_models: TinyModels, previous_checkpoint: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)
    config = write_config(out / "config.json", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    assert "holds the merge config" in refusal(config, out, "--force")


def test_the_current_folder_is_never_replaced_even_when_it_is_a_checkpoint(
    tmp_path: Path, config: Path, previous_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)
    monkeypatch.chdir(out)
    before = fingerprint(out)
    assert "current working directory" in refusal(config, ".", "--force")
    monkeypatch.chdir(out / "..")
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")
    assert "current working directory" in refusal(config, out, "--force")
    (out / "sub").rmdir()
    assert fingerprint(out) == before


def test_a_home_directory_and_its_ancestors_are_never_replaced(
    tmp_path: Path, config: Path, previous_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    shutil.copytree(previous_checkpoint, home)
    monkeypatch.setenv("HOME", str(home))
    assert "home directory" in refusal(config, home, "--force")
    monkeypatch.setenv("HOME", str(home / "user"))
    assert "home directory" in refusal(config, home, "--force")


def test_a_folder_containing_a_source_model_is_refused_with_or_without_force(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models.experts[0], models / "expert")
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [models / "expert", tiny_models.experts[1]])
    for extra in ((), ("--force",)):
        assert "contains source model" in refusal(config, models, *extra)
    assert (models / "expert" / "model.safetensors").is_file()


# --- the rule holds at the swap -------------------------------------------------------------------------------------


def finish_another_merge_meanwhile(
    monkeypatch: pytest.MonkeyPatch, out: Path, make_out: Callable[[Path], object]
) -> None:
    """Run `make_out(out)` right after this merge has written its checkpoint, before the swap."""
    original = pipeline.write_checkpoint

    def write_then_change_out(*args: object, **kwargs: object) -> object:
        written = original(*args, **kwargs)
        make_out(out)
        return written

    monkeypatch.setattr(pipeline, "write_checkpoint", write_then_change_out)


def test_without_force_a_checkpoint_written_meanwhile_is_kept(
    tmp_path: Path, config: Path, previous_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    finish_another_merge_meanwhile(monkeypatch, out, lambda target: shutil.copytree(previous_checkpoint, target))
    message = refusal(config, out)
    assert "changed while this merge ran" in message
    assert fingerprint(out) == fingerprint(previous_checkpoint)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["moe.yaml", "out"]


def test_with_force_out_replaced_meanwhile_by_other_files_is_kept(
    tmp_path: Path, config: Path, previous_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)

    def user_files(target: Path) -> None:
        shutil.rmtree(target)
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    finish_another_merge_meanwhile(monkeypatch, out, user_files)
    message = refusal(config, out, "--force")
    assert "changed while this merge ran" in message
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["moe.yaml", "out"]


def test_with_force_a_checkpoint_is_still_replaced(tmp_path: Path, config: Path, previous_checkpoint: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(previous_checkpoint, out)
    result = run_cli("merge", config, out, "--force", "--no-check")
    assert result.exit_code == 0, result.output
    assert fingerprint(out) != fingerprint(previous_checkpoint)
    assert not_a_checkpoint_reason(out) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["moe.yaml", "out"]


# --- dry run: writability; staging names ----------------------------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be created in: a read-only tmpfs for root (who ignores permissions), else mode 555."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    command = [mount or "mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
    if mount is None or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-run"])
def test_an_unwritable_parent_is_refused_before_any_work(read_only_folder: Path, config: Path, dry_run: bool) -> None:
    out = read_only_folder / "nested" / "out"
    message = refusal(config, out, *(["--dry-run"] if dry_run else []))
    assert f"Cannot write the output folder {out}: {read_only_folder} is " in message


def test_a_long_output_name_keeps_staging_names_within_the_limit(tmp_path: Path, config: Path) -> None:
    out = tmp_path / ("m" * 250)
    for sibling in (partial_folder(out), replaced_folder(out)):
        assert len(os.fsencode(sibling.name)) <= NAME_MAX
        assert sibling.parent == tmp_path
    assert partial_folder(out) != partial_folder(tmp_path / ("m" * 249 + "n"))
    result = run_cli("merge", config, out, "--no-check")
    assert result.exit_code == 0, result.output
    assert not_a_checkpoint_reason(out) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["moe.yaml", out.name])


def test_an_output_name_over_the_limit_is_refused_with_the_reason(tmp_path: Path, config: Path) -> None:
    message = refusal(config, tmp_path / ("é" * 130), "--dry-run")
    assert "260 bytes" in message
    assert f"{NAME_MAX}" in message
