"""Where the checkpoint goes: refuse dangerous targets, stage into a sibling folder, swap in atomically.

A merge writes into `.OUT.frankenmoe-partial` next to OUT and renames it to OUT only after every
file is written and verified, so OUT is either the previous checkpoint, absent, or complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from frankenmoe.errors import OutputError

PARTIAL_SUFFIX = ".frankenmoe-partial"
REPLACED_SUFFIX = ".frankenmoe-replaced"
OWNER_FILE = ".frankenmoe-owner"
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def check_output_target(out: Path, source_folders: Sequence[Path], force: bool) -> None:
    """Refuse targets that would destroy a source, clobber a checkpoint unasked, or collide with a run."""
    target = out.resolve()
    for source in source_folders:
        source = source.resolve()
        if target == source or source in target.parents:
            raise OutputError(
                f"The output folder {out} is {'a source model folder' if target == source else 'inside source model folder ' + str(source)}. "
                "Writing there could corrupt the model being read; choose an output folder outside every source model."
            )
        if target in source.parents and force:
            raise OutputError(
                f"The output folder {out} contains source model {source}; --force would delete it. Choose another output folder."
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"The output path {out} exists and is not a folder. Remove it or choose another path.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"The output folder {out} already exists and is not empty. Pass --force to replace it (it is replaced "
            "only after the new checkpoint is complete), or choose another folder."
        )
    partial = partial_folder(out)
    if partial.exists():
        owner = _owner_pid(partial)
        if owner is not None and _process_alive(owner):
            raise OutputError(
                f"Another frankenmoe merge (process {owner}) is writing {out} right now ({partial}). Wait for it or stop it."
            )
        if not force:
            raise OutputError(
                f"A stale partial output from an interrupted merge exists at {partial}. It is not a usable checkpoint. "
                "Pass --force to remove it and merge again, or delete it yourself."
            )


def check_free_space(out: Path, needed_bytes: int) -> int:
    """The free bytes on OUT's filesystem; refuse when the checkpoint cannot fit."""
    anchor = out.parent.resolve()
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    if needed_bytes + SPACE_MARGIN_BYTES > free:
        raise OutputError(
            f"Not enough disk space for the output: the checkpoint needs {format_bytes(needed_bytes)} "
            f"({needed_bytes} bytes) but {anchor} has only {format_bytes(free)} ({free} bytes) free. "
            "Free some space, choose an output folder on another disk, or use a smaller dtype."
        )
    return free


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes OUT, on any failure it is removed."""
    partial = partial_folder(out)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
        (partial / OWNER_FILE).write_text(str(os.getpid()))
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"Cannot create the output folder next to {out}: {error.strerror or error}.") from None
    try:
        yield partial
        (partial / OWNER_FILE).unlink()
        _swap_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _swap_into_place(partial: Path, out: Path) -> None:
    replaced = out.parent / f".{out.name}{REPLACED_SUFFIX}"
    shutil.rmtree(replaced, ignore_errors=True)
    if out.exists():
        os.replace(out, replaced)
    os.replace(partial, out)
    _fsync_folder(out.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
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
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1000
    return f"{count} B"
