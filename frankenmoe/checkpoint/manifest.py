"""The build record every merge leaves in OUT: frankenmoe-manifest.json.

It says what was built from what: the tool version, the config as given and the sha256 of its
normalised form, every source model's location and a fingerprint of each weight file, the seed
and every option that changes bytes, every output file with its size and sha256 (computed while
writing), wall time and peak RSS. `frankenmoe verify` checks a checkpoint against it, and
`frankenmoe build` uses it to skip a config whose output is up to date.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from frankenmoe import __version__
from frankenmoe.errors import ModelError
from frankenmoe.io.hashing import file_sha256
from frankenmoe.io.remote import split_repo_reference
from frankenmoe.sources.model import SourceModel
from frankenmoe.sources.resolve import cached_repo_id

MANIFEST_NAME = "frankenmoe-manifest.json"
MANIFEST_FORMAT = 1
SAMPLED_BLOCKS = 16
SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class FileRecord:
    """One output file: its name inside OUT, its size and its sha256."""

    name: str
    size: int
    sha256: str


def normalised_config_sha256(config_text: str) -> str:
    """sha256 of the config's data, independent of key order, comments and formatting."""
    data = yaml.safe_load(config_text)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def weight_fingerprint(path: Path, full_hash: bool = False) -> dict[str, Any]:
    """Size and a cheap content hash of one weight file, or its full sha256 with `full_hash`.

    The cheap hash covers the safetensors header (every tensor's name, dtype, shape and offsets) and
    SAMPLED_BLOCKS blocks spread evenly over the file: a file replaced by another fine-tune of the
    same shape differs there, and reading it costs a few MiB whatever the file's size.
    """
    size = path.stat().st_size
    record: dict[str, Any] = {"name": path.name, "size": size}
    if full_hash:
        record["sha256"] = file_sha256(path)
        return record
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        prefix = handle.read(8)
        if path.suffix == ".safetensors" and len(prefix) == 8:
            (length,) = struct.unpack("<Q", prefix)
            digest.update(prefix + handle.read(min(length, max(0, size - 8))))
        for block in range(SAMPLED_BLOCKS):
            digest.update(os.pread(handle.fileno(), SAMPLE_BYTES, size * block // SAMPLED_BLOCKS))
    record["sampled_sha256"] = digest.hexdigest()
    return record


def source_record(role: str, source: SourceModel, full_hash: bool = False) -> dict[str, Any]:
    """Where a source model was read from and a fingerprint of every file it gave weights or config."""
    # A Hub source fetched on demand holds only the shards the merge reads (hub.py); the others are not there.
    read = {location.file for location in source.tensors.values() if source.hub is None or location.file.is_file()}
    files = sorted(read | {source.path / "config.json"})
    model_reference = source.reference.partition("+")[0] if source.adapter is not None else source.reference
    record: dict[str, Any] = {"role": role, "reference": source.reference, "folder": str(source.path)}
    record.update(hub_location(source.path, model_reference))
    record["files"] = [weight_fingerprint(file, full_hash) for file in files]
    if source.adapter is not None:
        adapter_files = (source.adapter.weight_file, source.adapter.weight_file.parent / "adapter_config.json")
        record["adapter_files"] = [weight_fingerprint(file, full_hash) for file in adapter_files]
    return record


def source_records(
    base: SourceModel, experts: Sequence[SourceModel], shared_expert: SourceModel | None, full_hash: bool = False
) -> list[dict[str, Any]]:
    """The manifest's record of every source in config order, each under its role (a model named twice is listed
    twice): what a merge records and what `build` compares to decide whether an output is up to date."""
    roles = [("base", base), *((f"experts[{index}]", expert) for index, expert in enumerate(experts))]
    if shared_expert is not None:
        roles.append(("shared_experts[0]", shared_expert))
    return [source_record(role, source, full_hash) for role, source in roles]


def hub_location(folder: Path, reference: str) -> dict[str, str]:
    """repo id, revision and commit of a folder inside the Hugging Face cache; nothing for a local folder."""
    repo = cached_repo_id(folder)
    if repo is None:
        return {}
    return {"repo_id": repo, "revision": split_repo_reference(reference)[1], "commit": folder.name}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_manifest(
    *,
    config_text: str,
    sources: list[dict[str, Any]],
    options: dict[str, Any],
    architecture: str,
    files: list[FileRecord],
    timings: dict[str, float],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "frankenmoe_version": __version__,
        "config": config_text,
        "config_sha256": normalised_config_sha256(config_text),
        "architecture": architecture,
        "options": options,
        "sources": sources,
        "files": [{"name": file.name, "size": file.size, "sha256": file.sha256} for file in files],
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


class ManifestError(ModelError):
    """The build record is there but is not one frankenmoe could have written: unreadable JSON, a
    symbolic link, or wrong types. `problems` names every difference found."""

    def __init__(self, message: str, problems: tuple[str, ...]) -> None:
        super().__init__(message)
        self.problems = problems


def is_plain_name(name: object) -> bool:
    """Whether `name` is one file name inside a folder: not absolute, no folder part, not `.` or `..`.

    Every file a merge writes sits directly in OUT, so anything else in a manifest or an index would
    make a reader look outside the folder it was asked to check.
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def read_plain_file(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file, never following a symbolic link (OSError otherwise).

    O_NOFOLLOW makes the refusal part of the open itself, so a link swapped in after a check is not
    followed either; O_NONBLOCK keeps a FIFO from blocking the open until the fstat refuses it.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb", buffering=0) as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return handle.read()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest a merge left in `folder`, schema-checked.

    A ModelError when it is missing; a ManifestError (a ModelError too) when it is a symbolic link,
    not JSON, or does not have the types `check_manifest` expects.
    """
    path = folder / MANIFEST_NAME
    if not path.is_symlink() and not path.exists():
        raise ModelError(
            f"{folder} has no {MANIFEST_NAME}, so there is nothing to check it against. Only checkpoints written "
            "by frankenmoe 0.2 or later have one; merge again to get one."
        )
    try:
        data = json.loads(read_plain_file(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        why = "a symbolic link, which is never followed" if path.is_symlink() else f"not readable JSON ({error})"
        problem = f"{MANIFEST_NAME}: {why}"
        raise ManifestError(
            f"{path} is {why}; the build record is damaged or was replaced. Merge again to get a new one.", (problem,)
        ) from None
    problems = check_manifest(data)
    if problems:
        raise ManifestError(
            f"{path} is not a valid frankenmoe build record: {'; '.join(problems)}. It was edited or damaged; "
            "merge again to get a new one.",
            tuple(problems),
        )
    return data


MANIFEST_FIELDS: dict[str, type] = {
    "format": int,
    "frankenmoe_version": str,
    "config": str,
    "config_sha256": str,
    "architecture": str,
    "options": dict,
    "sources": list,
    "files": list,
}
"""Every field a manifest must have, with its JSON type (timings and peak RSS are informative only)."""
SOURCE_FIELDS: dict[str, type] = {"role": str, "reference": str, "folder": str, "files": list}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_manifest(data: object) -> list[str]:
    """Every way `data` differs from the manifest schema `build_manifest` writes, in words (empty when valid).

    Fields added by later versions are allowed; the ones listed here must have their types, and every
    output file must be a plain name inside OUT with a size and a sha256.
    """
    where = MANIFEST_NAME
    if not isinstance(data, dict):
        return [f"{where}: a JSON {_json_type(data)}, not an object"]
    problems = _field_problems(data, MANIFEST_FIELDS, where)
    for index, source in enumerate(data.get("sources") if isinstance(data.get("sources"), list) else []):
        at = f"{where}: sources[{index}]"
        if not isinstance(source, dict):
            problems.append(f"{at} is a JSON {_json_type(source)}, not an object")
            continue
        problems += _field_problems(source, SOURCE_FIELDS, at)
        for key in ("files", "adapter_files"):
            records = source.get(key, [])
            if not isinstance(records, list):
                problems.append(f"{at}.{key} is a JSON {_json_type(records)}, not a list")
                continue
            problems += [
                f"{at}.{key}[{position}] is not an object with a name and a size"
                for position, record in enumerate(records)
                if not isinstance(record, dict)
                or not isinstance(record.get("name"), str)
                or not _is_size(record.get("size"))
            ]
    for index, record in enumerate(data.get("files") if isinstance(data.get("files"), list) else []):
        at = f"{where}: files[{index}]"
        if not isinstance(record, dict):
            problems.append(f"{at} is a JSON {_json_type(record)}, not an object")
            continue
        name = record.get("name")
        if not is_plain_name(name):
            problems.append(
                f"{at}.name {name!r} is not a file name inside the checkpoint folder (an absolute path, a `..` or a "
                "folder part, or not a string); verify reads nothing outside the folder"
            )
        if not _is_size(record.get("size")):
            problems.append(f"{at}.size {record.get('size')!r} is not a byte count")
        if not isinstance(record.get("sha256"), str) or not SHA256_HEX.fullmatch(record["sha256"]):
            problems.append(f"{at}.sha256 {record.get('sha256')!r} is not a sha256 in hex")
    return problems


def _field_problems(data: dict[str, Any], fields: dict[str, type], where: str) -> list[str]:
    problems = []
    for key, kind in fields.items():
        if key not in data:
            problems.append(f"{where} has no {key!r}")
        elif type(data[key]) is not kind:  # exact: JSON's true is not an integer
            problems.append(f"{where}: {key!r} is a JSON {_json_type(data[key])}, not {JSON_TYPES[kind]}")
    return problems


JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(value: object) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
