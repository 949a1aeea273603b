"""Where the checkpoint goes: refuse dangerous targets, stage into a sibling folder, swap in atomically.

A merge writes into `.OUT.frankenmoe-partial` next to OUT and renames it to OUT only after every
file is written, verified and flushed to disk, so OUT is always either the previous checkpoint,
absent, or complete. A partial folder left by a killed run is recognised by its owner file (the
pid of the merge writing it) and removed only when that process is gone and the user asks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from frankenmoe.errors import FrankenMoEError, OutputError

PARTIAL_SUFFIX = ".frankenmoe-partial"
REPLACED_SUFFIX = ".frankenmoe-replaced"
OWNER_FILE = ".frankenmoe-owner"
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


def absolute_target(out: Path) -> Path:
    """OUT as an absolute path, normalised but with symlinks kept (the link is what gets replaced)."""
    return Path(os.path.abspath(out.expanduser()))


def partial_folder(out: Path) -> Path:
    target = absolute_target(out)
    return target.parent / f".{target.name}{PARTIAL_SUFFIX}"


def replaced_folder(out: Path) -> Path:
    target = absolute_target(out)
    return target.parent / f".{target.name}{REPLACED_SUFFIX}"


def check_output_target(out: Path, source_folders: Sequence[Path], force: bool) -> None:
    """Refuse targets that would destroy a source, clobber a checkpoint unasked, or collide with a run."""
    if not absolute_target(out).name:
        raise OutputError(f"The output folder {out} is a filesystem root. Choose a folder to create, e.g. {out}/moe.")
    target = out.resolve()
    for source in source_folders:
        source = source.resolve()
        if target == source:
            raise OutputError(
                f"The output folder {out} is the source model folder {source}. Writing there would destroy the "
                "model being read; choose an output folder outside every source model."
            )
        if source in target.parents:
            raise OutputError(
                f"The output folder {out} is inside source model folder {source}. Writing there could corrupt "
                "the model being read; choose an output folder outside every source model."
            )
        if target in source.parents and force:
            raise OutputError(
                f"The output folder {out} contains source model {source}; --force would delete it. "
                "Choose another output folder."
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"The output path {out} exists and is not a folder. Remove it or choose another path.")
    partial = partial_folder(out)
    if partial.exists():
        _refuse_if_owned_by_live_merge(partial, out)
        if not force:
            raise OutputError(
                f"A stale partial output from an interrupted merge exists at {partial}. It is not a usable "
                "checkpoint. Pass --force to remove it and merge again, or delete it yourself."
            )
    replaced = replaced_folder(out)
    if replaced.exists() and not out.exists() and not force:
        raise OutputError(
            f"A merge was killed while swapping in a new {out}: the previous checkpoint is still at {replaced}. "
            f"Rename it back to {out} to keep it, or pass --force to delete it and merge again."
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"The output folder {out} already exists and is not empty. Pass --force to replace it (it is replaced "
            "only after the new checkpoint is complete), or choose another folder."
        )


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
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes OUT, on any failure (Ctrl-C too) it is removed."""
    target = absolute_target(out)
    partial = partial_folder(out)
    if partial.exists():
        # check_output_target refused a stale folder unless --force was given, so one left here is ours to remove.
        _refuse_if_owned_by_live_merge(partial, out)
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
        with _sigint_ignored():
            shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(
            f"Cannot create the staging folder {partial} next to {out}: {error.strerror or error}. "
            "Check that the parent folder exists and is writable."
        ) from None
    try:
        yield partial
        (partial / OWNER_FILE).unlink()
        _flush_to_disk(partial)
        with _sigint_ignored():
            _swap_into_place(partial, target)
    except FrankenMoEError as error:
        with _sigint_ignored():
            shutil.rmtree(partial, ignore_errors=True)
        explained = type(error)(f"{error.message} The partial output was removed; {out} was not changed.")
        raise explained.with_traceback(error.__traceback__) from None
    except BaseException:
        with _sigint_ignored():
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _refuse_if_owned_by_live_merge(partial: Path, out: Path) -> None:
    owner = _owner_pid(partial)
    if owner is not None and _process_alive(owner):
        raise OutputError(
            f"Another frankenmoe merge (process {owner}) is writing {out} right now ({partial}). Wait for it to "
            "finish or stop it; if no merge is running, delete that folder."
        )


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and the folder itself, so the renamed checkpoint survives a power cut intact."""
    try:
        for path in folder.iterdir():
            if path.is_file():
                _fsync(path, os.O_RDONLY)
        _fsync(folder, os.O_RDONLY)
    except OSError as error:
        raise OutputError(f"Flushing {folder} to disk failed: {error.strerror or error}.") from None


def _swap_into_place(partial: Path, out: Path) -> None:
    """Move the previous OUT aside, the new one in, then delete the old; undo the first move if the second fails."""
    replaced = replaced_folder(out)
    try:
        _remove(replaced)
        had_previous = out.exists() or out.is_symlink()
        if had_previous:
            os.replace(out, replaced)
        try:
            os.replace(partial, out)
        except OSError:
            if had_previous:
                os.replace(replaced, out)
            raise
        _fsync(out.parent, os.O_RDONLY)
    except OSError as error:
        raise OutputError(f"Moving the finished checkpoint into {out} failed: {error.strerror or error}.") from None
    _remove(replaced)


def _remove(path: Path) -> None:
    """Delete a folder, or the symlink that stood for OUT, ignoring what is already gone."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C for a moment: cleanup and the final swap must not be abandoned half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


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


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1000
    return f"{count} B"
