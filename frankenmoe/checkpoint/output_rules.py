"""The rules for OUT, a merge's output folder: the names of its staging and set-aside siblings, what a merge
may replace, and the folders it never writes.

What a merge may replace is one rule, applied when it starts and again at the swap: without
--force OUT must be absent or empty; with --force it may also be a checkpoint a frankenmoe merge
wrote (see `not_a_checkpoint_reason`). A folder that is, or contains, a source model, the merge
config, the current directory or a home directory is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from frankenmoe.architectures.tables import TOKENIZER_FILES
from frankenmoe.checkpoint.recipe import CARD_MARKS
from frankenmoe.errors import OutputError

PARTIAL_SUFFIX = ".frankenmoe-partial"
REPLACED_SUFFIX = ".frankenmoe-replaced"
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


def check_name_lengths(out: Path, target: Path) -> None:
    for part in target.parts[1:]:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(
                f"The output path {out} has a name {size} bytes long ({part[:24]}...); file systems limit a name "
                f"to {NAME_MAX} bytes. Choose a shorter name."
            )


def refuse_protected(out: Path, resolved: Path, source_folders: Sequence[Path], config_path: Path | None) -> None:
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


def check_parent_writable(out: Path, target: Path) -> None:
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


def refuse_unless_replaceable(out: Path, target: Path, force: bool) -> None:
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


def has_entries(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
