"""Resolving a model reference: a local folder, or a Hugging Face repo id (`org/name[@revision]`) found on the
Hub or, offline, in the Hugging Face cache."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from frankenmoe.errors import ModelError
from frankenmoe.io.remote import split_repo_reference

if TYPE_CHECKING:
    from frankenmoe.sources.hub import HubRepo

HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_on_hub(reference: str) -> HubRepo | None:
    """The Hub repo a repo id names, resolved online; None for a local folder or in offline mode."""
    from frankenmoe.sources.hub import is_offline, resolve

    if Path(reference).expanduser().is_dir() or not _is_repo_id(reference) or is_offline():
        return None
    return resolve(reference)


def _is_repo_id(reference: str) -> bool:
    return not reference.startswith((".", "/", "~")) and HF_REPO_ID.match(reference) is not None


def resolve_reference(reference: str) -> Path:
    """A local folder, or a Hugging Face repo id (`org/name` or `org/name@revision`): its snapshot folder in
    the cache, fetched from the Hub with its small files (config, index, adapter files) unless offline."""
    candidate = Path(reference).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if not _is_repo_id(reference):
        raise ModelError(
            f"Model folder {reference!r} does not exist (looked for {candidate.resolve()}). "
            "Check the path in the config; relative paths are relative to the current directory."
        )
    hub = resolve_on_hub(reference)
    return _from_hf_cache(reference) if hub is None else hub.folder


def _from_hf_cache(reference: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = split_repo_reference(reference)
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        fetch = f"hf download {repo_id}" + (f" --revision {revision}" if "@" in reference else "")
        raise ModelError(
            f"Model {reference!r} is not a local folder and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and offline mode (--offline or HF_HUB_OFFLINE=1) forbids downloading it: "
            f"run without offline mode to fetch what the merge reads, fetch it first with `{fetch}`, or set "
            "source_model to a local folder."
        ) from None


def cached_repo_id(folder: Path) -> str | None:
    """`org/name` when `folder` is a snapshot in a Hugging Face cache (`models--org--name/snapshots/<commit>`),
    whether it was named by repo id or by that path."""
    snapshots, repo = folder.parent, folder.parent.parent
    if snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    # Repo ids cannot contain "--", so the cache's "/" -> "--" folder naming reverses unambiguously.
    return repo.name.removeprefix("models--").replace("--", "/")
