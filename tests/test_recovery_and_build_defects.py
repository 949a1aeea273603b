"""Issue 23: a killed --force swap and a killed build recover by themselves; Ctrl-C and SIGTERM stop a build;
build's output folders stay inside --out-dir; "up to date" includes the output's integrity and, with
--hash-sources, full hashes; a manifest of wrong types is "not up to date"; --force belongs to its own plan.

Kills and signals go to a real subprocess through a driver script that stops at one moment (the second
rename of a swap, or the writing of the Nth merge of a build) and touches a marker file there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import frankenmoe
from frankenmoe.checkpoint import output_folder as output
from frankenmoe.checkpoint.manifest import MANIFEST_NAME, SAMPLE_BYTES, SAMPLED_BLOCKS
from frankenmoe.checkpoint.output_recovery import OWNER_FILE
from frankenmoe.checkpoint.output_rules import partial_folder, replaced_folder
from frankenmoe.errors import ConfigError, OutputError
from frankenmoe.merging.batch import output_folder
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

IO_ERROR, CONFIG_ERROR = 4, 2
WAIT_SECONDS = 120
ROOT = Path(__file__).resolve().parents[1]
SHARD = "model-00001-of-00001.safetensors"

DRIVER = """
import os, select, signal, sys
from pathlib import Path

markers, mode, arguments = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C, whatever the parent ignores
wake_read, wake_write = os.pipe()
os.set_blocking(wake_write, False)
signal.set_wakeup_fd(wake_write)  # a pause ends when a signal arrives


def pause(stage):
    (markers / stage).touch()
    select.select([wake_read], [], [], 300)


if mode == "kill-between-renames":
    from frankenmoe.checkpoint import output_rules as output

    rename = os.rename

    def rename_or_die(source, target):
        # The second rename of a --force swap: OUT is already moved aside. kill -9 here.
        if str(source).endswith(output.PARTIAL_SUFFIX) and output.replaced_folder(Path(target)).exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(source, target)

    os.rename = rename_or_die
else:
    from frankenmoe.merging import batch
    from frankenmoe.io.shards import ShardWriter

    paused_merge = int(mode.removeprefix("writing-merge-"))
    merges = []
    execute_merge = batch.execute_merge

    def counted(prepared):
        merges.append(prepared.out)
        return execute_merge(prepared)

    batch.execute_merge = counted
    copy_bytes = ShardWriter.copy_bytes

    def copy_then_pause(self, location):
        copy_bytes(self, location)
        if len(merges) == paused_merge and not (markers / "writing").exists():
            pause("writing")

    ShardWriter.copy_bytes = copy_then_pause

from frankenmoe.cli import app

app(arguments, prog_name="frankenmoe")
"""


def run_driver(
    tmp_path: Path, mode: str, arguments: list[str | Path], send: signal.Signals | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI through the driver; with `send`, wait until it pauses while writing, then send that signal."""
    driver, markers = tmp_path / "driver.py", tmp_path / "markers"
    driver.write_text(DRIVER)
    markers.mkdir(exist_ok=True)
    command = [sys.executable, str(driver), str(markers), mode, *map(str, arguments)]
    # The subprocess imports the frankenmoe under test, whichever checkout runs the tests.
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    if send is not None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (markers / "writing").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                out, errors = process.communicate()
                pytest.fail(f"the run never paused while writing: exit {process.returncode}\n{out}\n{errors}")
            time.sleep(0.02)
        process.send_signal(send)
    try:
        out, errors = process.communicate(timeout=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        out, errors = process.communicate()
        pytest.fail(f"the run did not end\n{out}\n{errors}")
    return subprocess.CompletedProcess(command, process.returncode, out, errors)


def fingerprint(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: same size, same header."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x01]))


# --- 1: a --force swap killed between its two renames ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different finished checkpoints (2 and 3 experts): the previous OUT and a new one."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = []
    for count in (2, 3):
        config = write_config(root / f"{count}.yaml", tiny_models.base, tiny_models.experts[:count], gate_mode="random")
        result = run_cli("merge", config, root / f"x{count}", "--no-check")
        assert result.exit_code == 0, result.output
        made.append(root / f"x{count}")
    return made[0], made[1]


def test_a_kill_9_between_the_two_renames_of_a_force_swap_is_finished_by_the_next_run(
    tmp_path: Path, tiny_models: TinyModels, checkpoints: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(checkpoints[0], out)
    previous = fingerprint(out)
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")

    killed = run_driver(tmp_path, "kill-between-renames", ["merge", config, out, "--force", "--no-check"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and fingerprint(replaced_folder(out)) == previous
    staged = fingerprint(partial_folder(out))

    rerun = run_cli("merge", config, out)

    assert "the swap was finished" in rerun.stderr
    assert str(replaced_folder(out)) in rerun.stderr
    assert fingerprint(out) == staged != previous
    assert not replaced_folder(out).exists() and not partial_folder(out).exists()
    # What is left to say is the ordinary refusal of a merge without --force into a checkpoint.
    assert rerun.exit_code == IO_ERROR
    assert "already holds a checkpoint from an earlier merge" in rerun.stderr
    assert run_cli("verify", out).exit_code == 0


@pytest.mark.parametrize("staged", ["a flipped byte", "its writer's owner file", "nothing"])
def test_an_unusable_staged_checkpoint_of_a_killed_swap_puts_the_previous_one_back(
    tmp_path: Path, tiny_models: TinyModels, checkpoints: tuple[Path, Path], staged: str
) -> None:
    out = tmp_path / "out"
    shutil.copytree(checkpoints[0], replaced_folder(out))
    previous = fingerprint(replaced_folder(out))
    if staged != "nothing":
        shutil.copytree(checkpoints[1], partial_folder(out))
    if staged == "a flipped byte":
        flip_byte(partial_folder(out) / SHARD, (partial_folder(out) / SHARD).stat().st_size // 2)
    elif staged == "its writer's owner file":
        (partial_folder(out) / OWNER_FILE).write_text("999999999")  # no such process
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")

    rerun = run_cli("merge", config, out, "--dry-run")

    assert rerun.exit_code == IO_ERROR, rerun.output
    assert f"The previous checkpoint was moved back from {replaced_folder(out)} to {out}" in rerun.stderr
    assert fingerprint(out) == previous
    assert not replaced_folder(out).exists() and not partial_folder(out).exists()
    assert "--force to delete" not in rerun.stderr


def test_a_killed_swap_beside_foreign_files_is_refused_naming_the_previous_checkpoint_without_advising_force(
    tmp_path: Path, tiny_models: TinyModels, checkpoints: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(checkpoints[0], replaced_folder(out))
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")

    for extra in ([], ["--force"]):
        result = run_cli("merge", config, out, *extra)
        assert result.exit_code == IO_ERROR, result.output
        message = result.stderr.strip().splitlines()[-1]
        assert str(replaced_folder(out)) in message and "notes.txt" in message
        assert "--force" not in message
    assert replaced_folder(out).is_dir() and (out / "notes.txt").read_text() == "mine"


# --- 15: --force belongs to the plan that was made with it ----------------------------------------------------------


def test_a_plan_made_without_force_never_replaces_a_checkpoint_whatever_other_plans_asked(
    tmp_path: Path, tiny_models: TinyModels, checkpoints: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")
    unforced = frankenmoe.plan_merge(config, out, check_routing=False)  # OUT absent: no --force needed
    shutil.copytree(checkpoints[0], out)  # meanwhile another run wrote a checkpoint there
    frankenmoe.plan_merge(config, out, force=True, check_routing=False)  # planned, never run
    before = fingerprint(out)

    with pytest.raises(OutputError, match="changed while this merge ran"):
        frankenmoe.run_merge(unforced)

    assert fingerprint(out) == before
    assert not hasattr(output, "_forced_targets")


# --- builds: kill -9, Ctrl-C and SIGTERM -----------------------------------------------------------------------------


def write_variant(path: Path, base: Path, experts: list[Path]) -> Path:
    data = {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(e)} for e in experts]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def variants(tmp_path: Path, tiny_models: TinyModels) -> list[Path]:
    """three configs over copies of the tiny models (tests rewrite source files in place)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models.base, models / "base")
    for index, expert in enumerate(tiny_models.experts):
        shutil.copytree(expert, models / f"expert{index}")
    experts = [models / f"expert{index}" for index in range(3)]
    return [
        write_variant(tmp_path / f"{name}.yaml", models / "base", experts[:count])
        for name, count in (("one", 2), ("two", 3), ("three", 2))
    ]


def build(out_dir: Path, configs: list[Path], *options: str) -> tuple[int, dict[str, str], dict, str]:
    summary = out_dir.parent / "summary.json"
    summary.unlink(missing_ok=True)
    result = run_cli("build", *configs, "--out-dir", out_dir, "--json", summary, "--no-check", *options)
    data = json.loads(summary.read_text())
    reasons = {Path(outcome["config"]).stem: outcome["reason"] for outcome in data["outcomes"]}
    return result.exit_code, {Path(o["config"]).stem: o["status"] for o in data["outcomes"]}, reasons, result.output


def test_a_build_killed_while_writing_is_recovered_by_running_it_again(tmp_path: Path, variants: list[Path]) -> None:
    out_dir = tmp_path / "builds"
    killed = run_driver(
        tmp_path, "writing-merge-1", ["build", variants[0], "--out-dir", out_dir, "--no-check"], signal.SIGKILL
    )
    assert killed.returncode == -signal.SIGKILL
    assert partial_folder(out_dir / "one").is_dir()

    code, statuses, _, output_text = build(out_dir, variants[:1])

    assert code == 0, output_text
    assert statuses == {"one": "built"}
    assert f"Removed {partial_folder(out_dir / 'one')}" in output_text
    assert sorted(path.name for path in out_dir.iterdir()) == ["one"]
    assert run_cli("verify", out_dir / "one").exit_code == 0


@pytest.mark.parametrize(
    ("send", "code", "words"),
    [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_while_the_second_config_writes_stops_the_build(
    tmp_path: Path, variants: list[Path], send: signal.Signals, code: int, words: str
) -> None:
    out_dir, summary = tmp_path / "builds", tmp_path / "summary.json"
    arguments = ["build", *variants, "--out-dir", out_dir, "--json", summary, "--no-check"]

    result = run_driver(tmp_path, "writing-merge-2", arguments, send)

    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: The build was stopped by {words} (built: one.yaml; interrupted: two.yaml;")
    assert "skipped: three.yaml" in last
    data = json.loads(summary.read_text())
    assert [(Path(o["config"]).name, o["status"]) for o in data["outcomes"]] == [
        ("one.yaml", "built"),
        ("two.yaml", "interrupted"),
        ("three.yaml", "skipped"),
    ]
    assert data["exit_code"] == code and data["counts"]["skipped"] == 1
    assert "built 1, up to date 0, failed 0, interrupted 1, skipped 1" in result.stdout
    # The config being written left no staging folder and no output; the finished one is intact.
    assert sorted(path.name for path in out_dir.iterdir()) == ["one"]
    assert run_cli("verify", out_dir / "one").exit_code == 0


@pytest.mark.usefixtures("ctrl_c_during_the_swap")
def test_ctrl_c_during_a_swap_keeps_that_output_and_starts_no_later_config(
    tmp_path: Path, variants: list[Path]
) -> None:
    out_dir = tmp_path / "builds"

    code, statuses, reasons, output_text = build(out_dir, variants[:2])

    assert code == 130, output_text
    assert statuses == {"one": "built", "two": "skipped"}
    assert reasons["two"] == "not started: the build was stopped by Ctrl-C"
    assert sorted(path.name for path in out_dir.iterdir()) == ["one"]


# --- 4: output folders stay inside --out-dir -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..yaml", "...yaml"])
def test_a_config_whose_stem_is_dot_or_dot_dot_is_refused_before_any_work(
    tmp_path: Path, variants: list[Path], name: str
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    config = configs / name
    shutil.copy(variants[0], config)
    out_dir = tmp_path / "area" / "builds"
    out_dir.mkdir(parents=True)

    result = run_cli("build", config, "--out-dir", out_dir, "--no-check")

    assert result.exit_code == CONFIG_ERROR, result.output
    assert "is not a folder of its own inside --out-dir" in result.stderr
    assert "Rename the config file" in result.stderr
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in out_dir.parent.iterdir()) == ["builds"]


@pytest.mark.parametrize("config", ["", ".", "..", "configs/..yaml", "/"])
def test_output_folder_never_is_the_out_dir_or_outside_it(tmp_path: Path, config: str) -> None:
    with pytest.raises(ConfigError, match="not a folder of its own"):
        output_folder(Path(config), tmp_path / "builds")
    assert output_folder(Path("configs/.hidden.yaml"), tmp_path / "builds") == tmp_path / "builds" / ".hidden"


# --- 5 and 9: "up to date" includes the output's integrity; a damaged record means "not up to date" ------------------


def test_an_output_whose_shard_was_deleted_is_rebuilt_not_called_up_to_date(
    tmp_path: Path, variants: list[Path]
) -> None:
    out_dir, small_shards = tmp_path / "builds", ("--shard-size", "10MB")
    assert build(out_dir, variants[:2], *small_shards)[0] == 0
    second = sorted((out_dir / "two").glob("model-*.safetensors"))[1]
    second.unlink()

    code, statuses, reasons, _ = build(out_dir, variants[:2], *small_shards)

    assert code == 0 and statuses == {"one": "up to date", "two": "built"}
    assert reasons["two"] == f"the output is not what its build record lists ({second.name} is missing)"
    assert run_cli("verify", out_dir / "two").exit_code == 0


def test_a_byte_changed_in_an_output_is_rebuilt_with_hash_sources(tmp_path: Path, variants: list[Path]) -> None:
    out_dir = tmp_path / "builds"
    assert build(out_dir, variants[:1], "--hash-sources")[0] == 0
    shard = out_dir / "one" / SHARD
    flip_byte(shard, shard.stat().st_size // 2)

    # Without --hash-sources only sizes are compared: the documented limit.
    assert build(out_dir, variants[:1])[1] == {"one": "up to date"}
    code, statuses, reasons, _ = build(out_dir, variants[:1], "--hash-sources")

    assert code == 0 and statuses == {"one": "built"}
    assert reasons["one"].startswith(f"the output differs from its build record: {SHARD}: sha256 differs")
    assert run_cli("verify", out_dir / "one").exit_code == 0


def test_a_source_rewritten_in_place_between_sampled_blocks_is_seen_by_hash_sources(
    tmp_path: Path, variants: list[Path]
) -> None:
    out_dir = tmp_path / "builds"
    assert build(out_dir, variants[:1])[0] == 0
    weights = tmp_path / "models" / "expert0" / "model.safetensors"
    size = weights.stat().st_size
    gap = size // SAMPLED_BLOCKS
    assert gap > 2 * SAMPLE_BYTES  # the middle of two sampled blocks is read by neither
    flip_byte(weights, 8 * gap + gap // 2)

    assert build(out_dir, variants[:1])[1] == {"one": "up to date"}  # the sampled fingerprint's documented limit
    code, statuses, reasons, _ = build(out_dir, variants[:1], "--hash-sources")
    assert code == 0 and statuses == {"one": "built"}
    assert "only sampled fingerprints" in reasons["one"]

    flip_byte(weights, 8 * gap + gap // 2 + 1)  # the record now holds full hashes: the change itself is seen
    code, statuses, reasons, _ = build(out_dir, variants[:1], "--hash-sources")
    assert statuses == {"one": "built"} and reasons["one"] == "a source model's files changed"


@pytest.mark.parametrize(
    "damage",
    [{"options": []}, {"sources": [1, 2]}, {"files": None}, {"files": "x"}, {"files": [{"name": "../x", "size": 1}]}],
    ids=["options-list", "sources-ints", "files-null", "files-string", "files-outside"],
)
def test_a_manifest_of_wrong_types_makes_its_output_not_up_to_date_and_the_batch_goes_on(
    tmp_path: Path, variants: list[Path], damage: dict
) -> None:
    out_dir = tmp_path / "builds"
    assert build(out_dir, variants[:2])[0] == 0
    manifest = out_dir / "one" / MANIFEST_NAME
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **damage}))

    code, statuses, _, output_text = build(out_dir, variants[:2])

    assert code == 0, output_text
    assert statuses == {"one": "built", "two": "up to date"}
    assert run_cli("verify", out_dir / "one").exit_code == 0
