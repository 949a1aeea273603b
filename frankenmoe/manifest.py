"""The build record every merge leaves in OUT: frankenmoe-manifest.json.

It says what was built from what: the tool version, the config as given and the sha256 of its
normalised form, every source model's location and a fingerprint of each weight file, the seed
and every option that changes bytes, every output file with its size and sha256 (computed while
writing), wall time and peak RSS. `frankenmoe verify` checks a checkpoint against it, and
`frankenmoe build` uses it to skip a config whose output is up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from frankenmoe import __version__
from frankenmoe.errors import ModelError
from frankenmoe.sources import SourceModel

MANIFEST_NAME = "frankenmoe-manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 8 * 1024 * 1024
SAMPLED_BLOCKS = 16
SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True)
class FileRecord:
    """One output file: its name inside OUT, its size and its sha256."""

    name: str
    size: int
    sha256: str


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks.

        >>> import tempfile; folder = Path(tempfile.mkdtemp()); (folder / "x").write_bytes(b"abc")
        3
        >>> file_sha256(folder / "x")[:8]
        'ba7816bf'
    """
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


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
    files = sorted({location.file for location in source.tensors.values()} | {source.path / "config.json"})
    model_reference = source.reference.partition("+")[0] if source.adapter is not None else source.reference
    record: dict[str, Any] = {"role": role, "reference": source.reference, "folder": str(source.path)}
    record.update(hub_location(source.path, model_reference))
    record["files"] = [weight_fingerprint(file, full_hash) for file in files]
    if source.adapter is not None:
        adapter_files = (source.adapter.weight_file, source.adapter.weight_file.parent / "adapter_config.json")
        record["adapter_files"] = [weight_fingerprint(file, full_hash) for file in adapter_files]
    return record


def hub_location(folder: Path, reference: str) -> dict[str, str]:
    """repo id, revision and commit of a folder inside the Hugging Face cache; nothing for a local folder."""
    parts = folder.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return {}
    repo = parts[-3].removeprefix("models--").replace("--", "/")
    _, _, revision = reference.partition("@")
    return {"repo_id": repo, "revision": revision or "main", "commit": parts[-1]}


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


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest a merge left in `folder`; a ModelError when it is missing or unreadable."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{folder} has no {MANIFEST_NAME}, so there is nothing to check it against. Only checkpoints written "
            "by frankenmoe 0.2 or later have one; merge again to get one."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} cannot be read as JSON ({error}); the build record is damaged.") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ModelError(f"{path} is not a frankenmoe build record (no list of files).")
    return data
