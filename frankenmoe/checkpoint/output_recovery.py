"""What a killed merge into OUT left next to it: the staging folder's owner file, and recovering from a
killed --force swap (finished when the staged checkpoint verifies, undone otherwise).

A partial folder left by a killed run is recognised by its owner file (the pid of the merge writing it;
removed just before the swap) and is removed by the next run once that process is gone. Each step is
logged as a warning, and nothing advises a step that would delete the last good checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from frankenmoe.checkpoint.output_rules import (
    absolute_target,
    has_entries,
    not_a_checkpoint_reason,
    partial_folder,
    replaced_folder,
)
from frankenmoe.errors import OutputError

OWNER_FILE = ".frankenmoe-owner"

logger = logging.getLogger("frankenmoe")


StagedCheck = Callable[[Path], "str | None"]
"""Why a staged checkpoint does not match its manifest (None: it verifies). `verify` owns that check and sits
above this package, so the merge hands it in."""


def recover_interrupted_output(out: Path, staged_problem: StagedCheck) -> None:
    """Clear what a killed merge into OUT left next to it, so that running again needs no step from the user.

    A staging folder whose writer is gone is removed; one a live merge is writing is refused. A
    previous checkpoint that a killed --force swap moved aside is dealt with by `_recover_swap`.
    Each step is logged as a warning, naming the folders.
    """
    target = absolute_target(out)
    partial, replaced = partial_folder(out), replaced_folder(out)
    if partial.exists():
        refuse_if_owned_by_live_merge(partial, out)
    if present(replaced):
        _recover_swap(out, target, partial, replaced, staged_problem)
    elif partial.exists():
        remove_folder(partial)
        logger.warning(
            "Removed %s: the staging folder of an earlier merge into %s that was stopped before it finished "
            "(it was never a usable checkpoint).",
            partial,
            out,
        )


def _recover_swap(out: Path, target: Path, partial: Path, replaced: Path, staged_problem: StagedCheck) -> None:
    """A --force swap was killed: finish it when the staged checkpoint is complete and verified, else undo it."""
    if has_entries(target):
        reason = not_a_checkpoint_reason(target)
        if reason is not None:
            raise OutputError(
                f"{out} holds files that are not a frankenmoe checkpoint ({reason}), and {replaced} holds the "
                f"previous checkpoint of a merge that was killed while replacing {out}. Nothing was changed: look "
                f"at both, then move {replaced} back to {out} or delete it yourself, and run again."
            )
        # The killed run had completed its swap: only deleting the previous checkpoint was left.
        remove_folder(replaced)
        remove_folder(partial)
        logger.warning(
            "An earlier merge into %s was stopped just after putting its new checkpoint in place; deleted the "
            "previous checkpoint it had moved aside to %s, as that merge was asked to do.",
            out,
            replaced,
        )
        return
    problem = _staged_checkpoint_problem(partial, staged_problem)
    try:
        _clear_empty(target)
        if problem is None:
            os.rename(partial, target)
        else:
            remove_folder(partial)
            os.rename(replaced, target)
        fsync(target.parent, os.O_RDONLY)
    except OSError as error:
        raise OutputError(
            f"An earlier merge into {out} was killed while swapping in a new checkpoint, and putting things right "
            f"failed: {error.strerror or error}. The previous checkpoint is at {replaced}; rename it to {out} "
            "yourself to keep it."
        ) from None
    if problem is None:
        remove_folder(replaced)
        logger.warning(
            "An earlier merge into %s was killed between the two renames of its --force swap. Its new checkpoint "
            "was complete and verified against its manifest, so the swap was finished: it is now %s, and the "
            "previous checkpoint (%s) was deleted, as that merge was asked to do.",
            out,
            out,
            replaced,
        )
    else:
        logger.warning(
            "An earlier merge into %s was killed while swapping in a new checkpoint, which was not usable (%s). "
            "The previous checkpoint was moved back from %s to %s.",
            out,
            problem,
            replaced,
            out,
        )


def _staged_checkpoint_problem(partial: Path, staged_problem: StagedCheck) -> str | None:
    """Why a staging folder left by a killed swap is not a finished checkpoint; None when it verifies fully."""
    if partial.is_symlink() or not partial.is_dir():
        return f"there is no staged checkpoint at {partial}"
    if (partial / OWNER_FILE).exists():
        return "its merge had not finished writing it"
    reason = not_a_checkpoint_reason(partial)
    if reason is not None:
        return reason
    return staged_problem(partial)


def _clear_empty(target: Path) -> None:
    """Make way for a rename to OUT: an empty folder (or a link to one, or to nothing) stands for an absent OUT."""
    if target.is_symlink():
        target.unlink()
    elif target.is_dir():
        target.rmdir()


def present(path: Path) -> bool:
    """A folder, or a symlink even when dangling (a swapped symlink OUT is moved aside as the link)."""
    return path.is_symlink() or path.exists()


def refuse_if_owned_by_live_merge(partial: Path, out: Path) -> None:
    owner = _owner_pid(partial)
    if owner is not None and _process_alive(owner):
        raise OutputError(
            f"Another frankenmoe merge (process {owner}) is writing {out} right now ({partial}). Wait for it to "
            "finish or stop it; if no merge is running, delete that folder."
        )


def remove_folder(path: Path) -> None:
    """Delete a folder, or the symlink that stood for OUT, ignoring what is already gone."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _owner_pid(partial: Path) -> int | None:
    try:
        return int((partial / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
