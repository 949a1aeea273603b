"""`frankenmoe verify OUT`: is a checkpoint exactly what its build record says, and consistent in itself?

Two checks. Every file the manifest lists is re-hashed (size and sha256) and nothing else is in the
folder (hidden files included; a symbolic link is a difference, never followed). And the checkpoint agrees with itself: the index lists every tensor exactly once, in the
shard that holds it; the shards hold nothing the index does not list; every tensor the output
architecture's table implies for this config.json is there, with its shape and the config's dtype,
and there is no other.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frankenmoe.architectures.expected import detect_layout, expected_tensors
from frankenmoe.architectures.tables import (
    OUTPUT_ARCHITECTURES,
)
from frankenmoe.checkpoint.manifest import MANIFEST_NAME, ManifestError, is_plain_name, read_manifest, read_plain_file
from frankenmoe.errors import FrankenMoEError, ModelError
from frankenmoe.io.hashing import file_sha256
from frankenmoe.io.safetensors import (
    CONFIG_DTYPE_TO_SAFETENSORS,
    INDEX_NAME,
    SAFETENSORS_TO_CONFIG_DTYPE,
    TensorLocation,
    read_header,
)


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found: every difference, in words; `ok` when there is none."""

    path: Path
    files_checked: int
    tensors_checked: int
    problems: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What the build record says about the checkpoint that hashes cannot show (e.g. its NaN/Inf check)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def verify_output(folder: Path) -> VerifyReport:
    """Re-hash `folder`'s files against its manifest and check its tensors against its config.

    Nothing outside `folder` is read, opened or stat'ed: names in the manifest and the index must be
    plain file names in it, and a symbolic link is a difference by itself, never followed (verify
    runs on downloaded artefacts, whose files could point anywhere).

        >>> verify_output(Path("out/")).ok   # doctest: +SKIP
        True
    """
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder. Pass the folder a merge wrote.")
    entries = {path.name: path.lstat() for path in folder.iterdir()}
    notes: tuple[str, ...] = ()
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        # An invalid build record lists nothing trustworthy; what the folder holds is still checked.
        problems = [*error.problems, *_unlisted_problems(entries, set())]
        records = []
    else:
        records = manifest["files"]
        problems = _file_problems(folder, entries, records)
        non_finite = manifest["options"].get("non_finite_check")
        if isinstance(non_finite, str):
            notes = (f"NaN/Inf: {non_finite}",)
    from frankenmoe.checkpoint.gguf_file import gguf_folder_problems

    # A --format gguf output holds one GGUF file instead of shards and an index.
    tensor_problems, tensors = gguf_folder_problems(folder) or _tensor_problems(folder, entries)
    return VerifyReport(folder, len(records), tensors, (*problems, *tensor_problems), notes)


def _file_problems(folder: Path, entries: dict[str, os.stat_result], records: list[dict[str, Any]]) -> list[str]:
    """Each listed file against its record, from `entries` (lstat: a link is seen as a link, not followed)."""
    problems = []
    for record in records:
        name, size = record["name"], record["size"]
        entry = entries.get(name)
        if entry is None:
            problems.append(f"{name}: missing (the manifest lists it)")
        elif not stat.S_ISREG(entry.st_mode):
            problems.append(f"{name}: {_not_a_file(entry)}")
        elif entry.st_size != size:
            problems.append(f"{name}: {entry.st_size} bytes, the manifest says {size}")
        elif _sha256_inside(folder / name) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest's (the file was changed or damaged)")
    return problems + _unlisted_problems(entries, {record["name"] for record in records})


def _unlisted_problems(entries: dict[str, os.stat_result], listed: set[str]) -> list[str]:
    """Every entry of the folder the manifest does not list, hidden ones included, and a linked manifest."""
    problems = []
    for name, entry in sorted(entries.items()):
        if name in listed or (name == MANIFEST_NAME and not stat.S_ISLNK(entry.st_mode)):
            continue
        if name == MANIFEST_NAME or not stat.S_ISREG(entry.st_mode):
            problems.append(f"{name}: {_not_a_file(entry)}")
        else:
            problems.append(f"{name}: not in the manifest (added after the merge)")
    return problems


def _not_a_file(entry: os.stat_result) -> str:
    if stat.S_ISLNK(entry.st_mode):
        return "a symbolic link, not followed (a checkpoint holds plain files; this one could point anywhere)"
    what = "a folder" if stat.S_ISDIR(entry.st_mode) else "not a regular file"
    return f"{what} (a merge writes only plain files into its folder)"


def _sha256_inside(path: Path) -> str:
    try:
        return file_sha256(path, follow_symlinks=False)
    except OSError as error:  # replaced by a link or removed since the listing: a difference all the same
        return f"unreadable ({error.strerror or error})"


def index_problems(data: object) -> list[str]:
    """Every way `data` differs from the index a merge writes (empty when valid): a JSON object whose
    `weight_map` maps each tensor name to a plain shard file name inside the folder."""
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return [f"{INDEX_NAME}: no `weight_map` object mapping each tensor to its shard file"]
    return [
        f"{INDEX_NAME}: tensor {name!r} is mapped to {shard!r}, which is not a file name inside the checkpoint "
        "folder (an absolute path, a `..` or a folder part, or not a string); it was not read"
        for name, shard in weight_map.items()
        if not is_plain_name(shard)
    ]


def _read_json_inside(folder: Path, name: str) -> Any:
    return json.loads(read_plain_file(folder / name).decode("utf-8"))


def _tensor_problems(folder: Path, entries: dict[str, os.stat_result]) -> tuple[list[str], int]:
    """Index, shards and config.json against each other and against the architecture's table."""
    try:
        config = _read_json_inside(folder, "config.json")
        index = _read_json_inside(folder, INDEX_NAME)
    except (OSError, ValueError) as error:
        return [f"config.json or {INDEX_NAME} cannot be read as plain JSON files ({error})"], 0
    if not isinstance(config, dict):
        return ["config.json: not a JSON object"], 0
    if schema := index_problems(index):
        return schema, 0
    index = index["weight_map"]
    problems, stored = _stored_tensors(folder, entries, index)
    architecture = OUTPUT_ARCHITECTURES.get(str(config.get("model_type")))
    if architecture is None:
        return [*problems, f"config.json: model_type {config.get('model_type')!r} is not a frankenmoe output"], len(
            stored
        )
    try:
        expected = expected_tensors(architecture, detect_layout(architecture, stored), config)
    except (ModelError, KeyError, TypeError, ValueError) as error:
        return [*problems, f"config.json does not describe a {architecture.model_type} checkpoint ({error})"], len(
            stored
        )
    dtype = CONFIG_DTYPE_TO_SAFETENSORS.get(str(config.get("torch_dtype") or config.get("dtype")))
    for name, shape in expected.items():
        location = stored.get(name)
        if location is None:
            problems.append(f"{name}: missing (config.json implies it)")
        elif location.shape != shape:
            problems.append(f"{name}: shape {list(location.shape)}, config.json implies {list(shape)}")
        elif dtype is not None and location.dtype != dtype:
            problems.append(
                f"{name}: dtype {SAFETENSORS_TO_CONFIG_DTYPE.get(location.dtype, location.dtype)}, config.json says "
                f"{config.get('torch_dtype') or config.get('dtype')}"
            )
    problems += [
        f"{name}: an extra tensor {architecture.model_type} has no place for" for name in stored if name not in expected
    ]
    return problems, len(stored)


def _stored_tensors(
    folder: Path, entries: dict[str, os.stat_result], index: dict[str, str]
) -> tuple[list[str], dict[str, TensorLocation]]:
    """Every tensor in the shards the index names, and the problems of reading them or of matching the index."""
    problems: list[str] = []
    stored: dict[str, TensorLocation] = {}
    for shard in sorted(set(index.values())):
        entry = entries.get(shard)
        if entry is not None and not stat.S_ISREG(entry.st_mode):
            problems.append(f"{shard}: its tensors were not checked: {_not_a_file(entry)}")
            continue
        try:
            header = read_header(folder / shard)
        except FrankenMoEError as error:
            problems.append(f"{shard}: {error.message}")
            continue
        for name, location in header.items():
            if name in stored:
                problems.append(f"{name}: stored in both {stored[name].file.name} and {shard}")
            stored[name] = location
    for name, shard in index.items():
        if name in stored and stored[name].file.name != shard:
            problems.append(f"{name}: the index says {shard}, but it is in {stored[name].file.name}")
        elif name not in stored and not any(problem.startswith(str(shard)) for problem in problems):
            problems.append(f"{name}: listed in the index, in no shard")
    problems += [
        f"{name}: in {stored[name].file.name}, not listed in the index" for name in stored if name not in index
    ]
    return problems, stored


def manifest_mismatch(folder: Path) -> str | None:
    """The first way `folder` differs from its manifest, or None when it verifies fully (checkpoint.StagedCheck)."""
    try:
        report = verify_output(folder)
    except FrankenMoEError as error:
        return error.message
    if not report.ok:
        return f"it does not match its manifest: {report.problems[0]}"
    return None
