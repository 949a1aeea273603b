"""Where the checkpoint goes: refuse dangerous targets, stage into a sibling folder, swap in atomically.
(output_rules.py holds the rules for OUT, output_recovery.py the clean-up after a killed merge.)

A merge writes into `.OUT.frankenmoe-partial` next to OUT and renames it to OUT only after every
file is written, verified and flushed to disk, so OUT is always either the previous checkpoint,
absent, or complete. A partial folder left by a killed run is recognised by its owner file (the
pid of the merge writing it; removed just before the swap) and is removed by the next run once that
process is gone: it is never a usable checkpoint. A --force swap is two renames (OUT aside to
`.OUT.frankenmoe-replaced`, the staged folder to OUT); when a run was killed between them, the next
run finishes the swap if the staged folder is a complete checkpoint that verifies against its
manifest, and otherwise puts the previous checkpoint back (`recover_interrupted_output`). Either
way it says what it did, and nothing advises a step that would delete the last good checkpoint.

What a merge may replace is one rule, applied when it starts and again at the swap: without
--force OUT must be absent or empty; with --force it may also be a checkpoint a frankenmoe merge
wrote (see `not_a_checkpoint_reason`). A folder that is, or contains, a source model, the merge
config, the current directory or a home directory is never used.

Ctrl-C and SIGTERM raise in the main thread (see `interrupt_scope`) until the new checkpoint is in
place, so the staging folder is removed on the way out; from the swap on they are held, because the
merge has succeeded by then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from frankenmoe.checkpoint.output_recovery import (
    OWNER_FILE,
    StagedCheck,
    fsync,
    present,
    recover_interrupted_output,
    refuse_if_owned_by_live_merge,
    remove_folder,
)
from frankenmoe.checkpoint.output_rules import (
    absolute_target,
    check_name_lengths,
    check_parent_writable,
    has_entries,
    not_a_checkpoint_reason,
    partial_folder,
    refuse_protected,
    refuse_unless_replaceable,
    replaced_folder,
)
from frankenmoe.errors import FrankenMoEError, OutputError
from frankenmoe.io.sizes import format_bytes
from frankenmoe.runtime.interrupts import interrupts_held, mark_committed

SPACE_MARGIN_BYTES = 16 * 1024 * 1024


def check_output_target(
    out: Path, source_folders: Sequence[Path], config_path: Path | None, force: bool, staged_problem: StagedCheck
) -> None:
    """Refuse, before any work, an OUT the merge may not write or replace (the rule is in output_rules.py's docstring).

    `staged_problem` judges a checkpoint a killed swap left staged (see `recover_interrupted_output`)."""
    target = absolute_target(out)
    if not target.name:
        raise OutputError(f"The output folder {out} is a filesystem root. Choose a folder to create, e.g. {out}/moe.")
    check_name_lengths(out, target)
    refuse_protected(out, target.resolve(), source_folders, config_path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"The output path {out} exists and is not a folder. Remove it or choose another path.")
    check_parent_writable(out, target)
    recover_interrupted_output(out, staged_problem)
    if has_entries(target):
        refuse_unless_replaceable(out, target, force)


def check_free_space(out: Path, needed_bytes: int) -> int:
    """The free bytes on OUT's filesystem; refuse when the checkpoint cannot fit."""
    anchor = absolute_target(out).parent
    while not anchor.exists():
        anchor = anchor.parent
    try:
        free = shutil.disk_usage(anchor).free
    except OSError as error:
        raise OutputError(f"Cannot read the free space of {anchor}: {error.strerror or error}.") from None
    if needed_bytes + SPACE_MARGIN_BYTES > free:
        raise OutputError(
            f"Not enough disk space for the output: the checkpoint needs {format_bytes(needed_bytes)} "
            f"({needed_bytes} bytes, plus a {format_bytes(SPACE_MARGIN_BYTES)} margin) but {anchor} has only "
            f"{format_bytes(free)} ({free} bytes) free. Free some space, choose an output folder on another disk, "
            "or use a smaller dtype."
        )
    return free


def check_complete(folder: Path, expected_files: Iterable[str]) -> None:
    """Every file the checkpoint needs is present in `folder`; a missing one means the write went wrong."""
    missing = sorted(name for name in expected_files if not (folder / name).is_file())
    if missing:
        raise OutputError(
            f"The staged checkpoint in {folder} is missing {', '.join(missing)}. The output was discarded; "
            "run the merge again (with --verbose to see what happened)."
        )


@contextlib.contextmanager
def staged_output(out: Path, *, replace_checkpoint: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes OUT, on any failure (Ctrl-C, SIGTERM too) it is removed.

    At the swap OUT must still be what check_output_target accepted: absent or empty or, with
    `replace_checkpoint` (the merge's own --force, passed by its caller), a checkpoint a merge wrote.
    Whatever else another run put there meanwhile is kept.
    """
    target = absolute_target(out)
    partial = partial_folder(out)
    if partial.exists():
        # A merge killed since check_output_target ran: its folder is ours to remove once its writer is gone.
        refuse_if_owned_by_live_merge(partial, out)
        shutil.rmtree(partial)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        (partial / OWNER_FILE).write_text(str(os.getpid()))
    except OSError as error:
        if isinstance(error, FileExistsError) and partial.is_dir():
            raise OutputError(
                f"Another frankenmoe merge started writing {out} at the same moment ({partial}). Wait for it to finish."
            ) from None
        _discard(partial)
        raise OutputError(
            f"Cannot create the staging folder {partial} next to {out}: {error.strerror or error}. "
            "Check that the parent folder exists and is writable."
        ) from None
    try:
        yield partial
        _flush_to_disk(partial)
        with interrupts_held():
            # The owner file goes last, so that a staging folder without one is one whose writer was killed
            # in the swap itself, not one still being flushed (which the next run would take as abandoned).
            (partial / OWNER_FILE).unlink()
            fsync(partial, os.O_RDONLY)
            _swap_into_place(partial, target, out, replace_checkpoint)
            mark_committed()
    except FrankenMoEError as error:
        _discard(partial)
        explained = type(error)(f"{error.message} The partial output was removed; {out} was not changed.")
        raise explained.with_traceback(error.__traceback__) from None
    except BaseException:
        _discard(partial)
        raise


def _discard(partial: Path) -> None:
    with interrupts_held():
        shutil.rmtree(partial, ignore_errors=True)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and the folder itself, so the renamed checkpoint survives a power cut intact."""
    try:
        for path in folder.iterdir():
            if path.is_file():
                fsync(path, os.O_RDONLY)
        fsync(folder, os.O_RDONLY)
    except OSError as error:
        raise OutputError(f"Flushing {folder} to disk failed: {error.strerror or error}.") from None


def _swap_into_place(partial: Path, target: Path, out: Path, replace_checkpoint: bool) -> None:
    """Rename the staged checkpoint to OUT, re-checking OUT: another run may have written it since the start.

    Without --force the rename itself enforces "absent or empty": it fails on a non-empty folder or a
    file. With --force a checkpoint there is first moved aside, and deleted once the new one is in place.
    """
    replaced = replaced_folder(target)
    if present(replaced) and (not has_entries(target) or not_a_checkpoint_reason(target) is not None):
        raise OutputError(
            f"While this merge ran, another merge into {out} was killed while swapping, and the previous checkpoint "
            f"is at {replaced}. The new checkpoint was not moved there. Run the merge again: it first finishes or "
            "undoes that interrupted swap."
        )
    try:
        remove_folder(replaced)  # left by a swap that completed and was stopped before deleting it
        if replace_checkpoint and has_entries(target):
            reason = not_a_checkpoint_reason(target)
            if reason is not None:
                raise OutputError(_changed_meanwhile(out, f"it is no longer a checkpoint a merge wrote ({reason})"))
            os.replace(target, replaced)
            try:
                os.rename(partial, target)
            except OSError:
                os.replace(replaced, target)
                raise
        else:
            if target.is_symlink() and not has_entries(target):
                target.unlink()  # a link to an empty folder, or to nothing, stands for an absent OUT
            os.rename(partial, target)
        fsync(target.parent, os.O_RDONLY)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise OutputError(
                _changed_meanwhile(out, "it was absent or empty when the merge began, and is not now")
            ) from None
        raise OutputError(f"Moving the finished checkpoint into {out} failed: {error.strerror or error}.") from None
    remove_folder(replaced)


def _changed_meanwhile(out: Path, reason: str) -> str:
    return (
        f"{out} changed while this merge ran: {reason}. Another merge or program wrote it, so the new checkpoint "
        f"was not moved there. Look at what {out} holds now, then merge again into another folder (or with --force "
        "to replace a checkpoint)."
    )
