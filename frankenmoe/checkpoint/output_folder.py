"""Where the checkpoint goes: refuse dangerous targets, stage into a sibling folder, swap in atomically.

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
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from frankenmoe.architectures.tables import TOKENIZER_FILES
from frankenmoe.checkpoint.recipe import CARD_MARKS
from frankenmoe.errors import FrankenMoEError, OutputError
from frankenmoe.io.sizes import format_bytes
from frankenmoe.runtime.interrupts import interrupts_held, mark_committed

PARTIAL_SUFFIX = ".frankenmoe-partial"
REPLACED_SUFFIX = ".frankenmoe-replaced"
OWNER_FILE = ".frankenmoe-owner"
SPACE_MARGIN_BYTES = 16 * 1024 * 1024
NAME_MAX = 255
"""The longest file name, in bytes, that the common Linux and macOS file systems accept."""
NAME_HASH_CHARS = 12

CHECKPOINT_FILES = frozenset(
    {"config.json", "model.safetensors.index.json", "README.md", "frankenmoe-manifest.json", *TOKENIZER_FILES}
)
"""What a merge writes besides its shards: config, index, model card, build manifest, the base's tokenizer files.

Names, not imports, so that this module loads without torch; a test merges and checks that the output
passes not_a_checkpoint_reason, which catches a file the writer adds and this list misses.
"""
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
GGUF_FILE_NAME = re.compile(r"model-[A-Z0-9_]+\.gguf")
"""The one file of a `--format gguf` merge (gguf_output.GGUF_NAME), written instead of shards and index."""
CARD_READ_LIMIT = 1024 * 1024
SHOWN_NAMES = 5

logger = logging.getLogger("frankenmoe")


def absolute_target(out: Path) -> Path:
    """OUT as an absolute path, normalised but with symlinks kept (the link is what gets replaced)."""
    return Path(os.path.abspath(out.expanduser()))


def partial_folder(out: Path) -> Path:
    return _sibling(out, PARTIAL_SUFFIX)


def replaced_folder(out: Path) -> Path:
    return _sibling(out, REPLACED_SUFFIX)


def _sibling(out: Path, suffix: str) -> Path:
    """`.OUT<suffix>` next to OUT; a long OUT name is cut and tagged with its hash so the name fits NAME_MAX."""
    target = absolute_target(out)
    name = f".{target.name}{suffix}"
    if len(os.fsencode(name)) <= NAME_MAX:
        return target.parent / name
    tag = "~" + hashlib.sha256(os.fsencode(target.name)).hexdigest()[:NAME_HASH_CHARS]
    kept = target.name
    while len(os.fsencode(f".{kept}{tag}{suffix}")) > NAME_MAX:
        kept = kept[:-1]
    return target.parent / f".{kept}{tag}{suffix}"


def check_output_target(
    out: Path, source_folders: Sequence[Path], config_path: Path | None, force: bool, staged_problem: StagedCheck
) -> None:
    """Refuse, before any work, an OUT the merge may not write or replace (the rule is in the module docstring).

    `staged_problem` judges a checkpoint a killed swap left staged (see `recover_interrupted_output`)."""
    target = absolute_target(out)
    if not target.name:
        raise OutputError(f"The output folder {out} is a filesystem root. Choose a folder to create, e.g. {out}/moe.")
    _check_name_lengths(out, target)
    _refuse_protected(out, target.resolve(), source_folders, config_path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"The output path {out} exists and is not a folder. Remove it or choose another path.")
    _check_parent_writable(out, target)
    recover_interrupted_output(out, staged_problem)
    if _has_entries(target):
        _refuse_unless_replaceable(out, target, force)


def not_a_checkpoint_reason(folder: Path) -> str | None:
    """Why `folder` is not recognisably a checkpoint a frankenmoe merge wrote; None when it is one.

    It must hold config.json, its weights (safetensors shards, or a GGUF file) and frankenmoe's model
    card, and nothing a merge does not write: any other file or folder may be someone's work, which replacing OUT would delete.
    """
    entries = sorted(folder.iterdir())
    foreign = [entry.name for entry in entries if not _written_by_a_merge(entry)]
    if foreign:
        return f"it holds {_list_names(foreign)}, which a merge does not write"
    names = {entry.name for entry in entries}
    if "config.json" not in names:
        return "it has no config.json"
    if not any(SHARD_NAME.fullmatch(name) or GGUF_FILE_NAME.fullmatch(name) for name in names):
        return "it has no weights (safetensors shards or a GGUF file)"
    if "README.md" not in names:
        return "it has no frankenmoe model card (README.md)"
    if not _is_frankenmoe_card(folder / "README.md"):
        return "its README.md is not a frankenmoe model card"
    return None


def _check_name_lengths(out: Path, target: Path) -> None:
    for part in target.parts[1:]:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(
                f"The output path {out} has a name {size} bytes long ({part[:24]}...); file systems limit a name "
                f"to {NAME_MAX} bytes. Choose a shorter name."
            )


def _refuse_protected(out: Path, resolved: Path, source_folders: Sequence[Path], config_path: Path | None) -> None:
    """Folders a merge never writes or replaces, whatever they hold and with --force or not."""
    for source in source_folders:
        source = source.resolve()
        if resolved == source:
            raise OutputError(
                f"The output folder {out} is the source model folder {source}. Writing there would destroy the "
                "model being read; choose an output folder outside every source model."
            )
        if source in resolved.parents:
            raise OutputError(
                f"The output folder {out} is inside source model folder {source}. Writing there could corrupt "
                "the model being read; choose an output folder outside every source model."
            )
        if resolved in source.parents:
            raise OutputError(
                f"The output folder {out} contains source model {source}; replacing it would delete that model. "
                "Choose an output folder outside every source model."
            )
    if config_path is not None and resolved in config_path.resolve().parents:
        raise OutputError(
            f"The output folder {out} holds the merge config {config_path}; replacing it would delete the config. "
            f"Choose a folder of its own for the checkpoint, e.g. {out / 'moe'}."
        )
    for folder, what in _protected_folders():
        if resolved == folder or resolved in folder.parents:
            relation = "is" if resolved == folder else "contains"
            raise OutputError(
                f"The output folder {out} {relation} {what} {folder}, which a merge never replaces. "
                f"Choose a folder of its own for the checkpoint, e.g. {out / 'moe'}."
            )


def _protected_folders() -> list[tuple[Path, str]]:
    """The current directory and this user's home directory (from $HOME and from the password database)."""
    protected = []
    with contextlib.suppress(OSError):  # a deleted current directory protects nothing
        protected.append((Path.cwd(), "the current working directory"))
    homes = {os.path.expanduser("~")}
    with contextlib.suppress(ImportError, KeyError):
        import pwd

        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    protected += [(Path(home).resolve(), "the home directory") for home in sorted(homes) if os.path.isabs(home)]
    return protected


def _check_parent_writable(out: Path, target: Path) -> None:
    """The staging folder and OUT are made in OUT's parent (created if missing): its nearest existing folder must allow it."""
    anchor = target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(
            f"Cannot write the output folder {out}: {anchor} is a file, not a folder. Choose another path."
        )
    if not os.access(anchor, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _on_read_only_file_system(anchor) else "is not writable by this user"
        raise OutputError(
            f"Cannot write the output folder {out}: {anchor} {why}, and the merge must create its staging folder "
            "there. Choose an output folder on a writable disk, or fix the folder's permissions."
        )


def _on_read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
        _refuse_if_owned_by_live_merge(partial, out)
    if _exists(replaced):
        _recover_swap(out, target, partial, replaced, staged_problem)
    elif partial.exists():
        _remove(partial)
        logger.warning(
            "Removed %s: the staging folder of an earlier merge into %s that was stopped before it finished "
            "(it was never a usable checkpoint).",
            partial,
            out,
        )


def _recover_swap(out: Path, target: Path, partial: Path, replaced: Path, staged_problem: StagedCheck) -> None:
    """A --force swap was killed: finish it when the staged checkpoint is complete and verified, else undo it."""
    if _has_entries(target):
        reason = not_a_checkpoint_reason(target)
        if reason is not None:
            raise OutputError(
                f"{out} holds files that are not a frankenmoe checkpoint ({reason}), and {replaced} holds the "
                f"previous checkpoint of a merge that was killed while replacing {out}. Nothing was changed: look "
                f"at both, then move {replaced} back to {out} or delete it yourself, and run again."
            )
        # The killed run had completed its swap: only deleting the previous checkpoint was left.
        _remove(replaced)
        _remove(partial)
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
            _remove(partial)
            os.rename(replaced, target)
        _fsync(target.parent, os.O_RDONLY)
    except OSError as error:
        raise OutputError(
            f"An earlier merge into {out} was killed while swapping in a new checkpoint, and putting things right "
            f"failed: {error.strerror or error}. The previous checkpoint is at {replaced}; rename it to {out} "
            "yourself to keep it."
        ) from None
    if problem is None:
        _remove(replaced)
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


def _exists(path: Path) -> bool:
    """A folder, or a symlink even when dangling (a swapped symlink OUT is moved aside as the link)."""
    return path.is_symlink() or path.exists()


def _refuse_unless_replaceable(out: Path, target: Path, force: bool) -> None:
    reason = not_a_checkpoint_reason(target)
    if reason is not None:
        raise OutputError(
            f"The output folder {out} is not empty and is not a checkpoint a frankenmoe merge wrote: {reason}. "
            "A merge replaces nothing else, even with --force, so that it cannot delete anyone's files. Choose a "
            "new or empty folder, or move those files out of the way yourself."
        )
    if not force:
        raise OutputError(
            f"The output folder {out} already holds a checkpoint from an earlier merge. Pass --force to replace it "
            "(it is replaced only once the new checkpoint is complete), or choose another folder."
        )


def _written_by_a_merge(entry: Path) -> bool:
    name = entry.name
    return (
        entry.is_file()
        and not entry.is_symlink()
        and (name in CHECKPOINT_FILES or bool(SHARD_NAME.fullmatch(name) or GGUF_FILE_NAME.fullmatch(name)))
    )


def _is_frankenmoe_card(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            text = handle.read(CARD_READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return False
    return all(mark in text for mark in CARD_MARKS)


def _list_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown if len(names) <= SHOWN_NAMES else f"{shown} and {len(names) - SHOWN_NAMES} more"


def _has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


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
            _fsync(partial, os.O_RDONLY)
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


def _swap_into_place(partial: Path, target: Path, out: Path, replace_checkpoint: bool) -> None:
    """Rename the staged checkpoint to OUT, re-checking OUT: another run may have written it since the start.

    Without --force the rename itself enforces "absent or empty": it fails on a non-empty folder or a
    file. With --force a checkpoint there is first moved aside, and deleted once the new one is in place.
    """
    replaced = replaced_folder(target)
    if _exists(replaced) and (not _has_entries(target) or not_a_checkpoint_reason(target) is not None):
        raise OutputError(
            f"While this merge ran, another merge into {out} was killed while swapping, and the previous checkpoint "
            f"is at {replaced}. The new checkpoint was not moved there. Run the merge again: it first finishes or "
            "undoes that interrupted swap."
        )
    try:
        _remove(replaced)  # left by a swap that completed and was stopped before deleting it
        if replace_checkpoint and _has_entries(target):
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
            if target.is_symlink() and not _has_entries(target):
                target.unlink()  # a link to an empty folder, or to nothing, stands for an absent OUT
            os.rename(partial, target)
        _fsync(target.parent, os.O_RDONLY)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise OutputError(
                _changed_meanwhile(out, "it was absent or empty when the merge began, and is not now")
            ) from None
        raise OutputError(f"Moving the finished checkpoint into {out} failed: {error.strerror or error}.") from None
    _remove(replaced)


def _changed_meanwhile(out: Path, reason: str) -> str:
    return (
        f"{out} changed while this merge ran: {reason}. Another merge or program wrote it, so the new checkpoint "
        f"was not moved there. Look at what {out} holds now, then merge again into another folder (or with --force "
        "to replace a checkpoint)."
    )


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
