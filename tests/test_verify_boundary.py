"""`verify` as a security boundary: it runs on downloaded artefacts, so nothing a manifest, an index or
a symbolic link names outside OUT is ever opened, and a build record or index of the wrong shape is a
reported difference (exit 5), never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from frankenmoe.checkpoint.manifest import MANIFEST_NAME, ManifestError, read_manifest
from frankenmoe.errors import FrankenMoEError
from frankenmoe.io.safetensors import INDEX_NAME
from frankenmoe.merging.writer import NON_FINITE_CHECK
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

OPENED: list[str] | None = None
"""Paths opened while a test records them (an audit hook cannot be removed, so it is installed once)."""


def _record_opens(event: str, arguments: tuple[Any, ...]) -> None:
    if OPENED is not None and event == "open" and isinstance(arguments[0], (str, bytes, os.PathLike)):
        OPENED.append(os.path.abspath(os.fsdecode(arguments[0])))


sys.addaudithook(_record_opens)


@pytest.fixture(scope="module")
def built(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify-boundary")
    config = write_config(root / "config.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    result = run_cli("merge", config, root / "out", "--no-check", "--shard-size", "150KB")
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture()
def out(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of an intact checkpoint, inside tmp_path/inside so that tmp_path/outside is outside it."""
    copy = tmp_path / "inside" / "out"
    shutil.copytree(built, copy)
    (tmp_path / "outside").mkdir()
    return copy


def manifest_of(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST_NAME).read_text())


def save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def forge(out: Path, name: str, data: bytes) -> None:
    """Rewrite a file and its manifest record consistently, as a hostile uploader would."""
    (out / name).write_bytes(data)
    manifest = manifest_of(out)
    for record in manifest["files"]:
        if record["name"] == name:
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    save_manifest(out, manifest)


def verify(out: Path) -> tuple[int, str]:
    code, output, _ = verify_opening(out)
    return code, output


def verify_opening(out: Path) -> tuple[int, str, list[str]]:
    """verify's exit code and output, and every path it opened."""
    global OPENED
    OPENED = []
    try:
        result = run_cli("verify", out)
        return result.exit_code, result.output, OPENED
    finally:
        OPENED = None


def first_shard(out: Path) -> str:
    return sorted(path.name for path in out.glob("model-*.safetensors"))[0]


def test_an_intact_copy_verifies(out: Path) -> None:
    files = len(list(out.iterdir())) - 1  # all but the manifest itself
    tensors = len(json.loads((out / INDEX_NAME).read_text())["weight_map"])

    note = f"note: NaN/Inf: {NON_FINITE_CHECK}\n"  # what the build record guarantees beyond the hashes
    assert verify(out) == (0, f"{note}{out}: intact ({files} files, {tensors} tensors checked)\n")


@pytest.mark.parametrize("escape", ["absolute", "parent"])
def test_a_manifest_entry_outside_out_is_a_difference_and_is_never_opened(
    out: Path, tmp_path: Path, escape: str
) -> None:
    # The file really is elsewhere, with exactly the recorded size and hash: following the entry "passes".
    target = tmp_path / "outside" / "README.md" if escape == "absolute" else out.parent / "README.md"
    shutil.move(out / "README.md", target)
    entry = str(target) if escape == "absolute" else "../README.md"
    manifest = manifest_of(out)
    for record in manifest["files"]:
        if record["name"] == "README.md":
            record["name"] = entry
    save_manifest(out, manifest)

    code, output, opened = verify_opening(out)

    assert code == 5
    assert f"differs: {MANIFEST_NAME}: files[" in output
    assert f"name {entry!r} is not a file name inside the checkpoint folder" in output
    assert str(target) not in opened
    assert str(target.stat().st_size) not in output


def test_a_shard_linked_to_a_file_outside_out_is_a_difference_and_is_never_opened(out: Path, tmp_path: Path) -> None:
    shard = first_shard(out)
    target = tmp_path / "outside" / shard
    shutil.move(out / shard, target)
    (out / shard).symlink_to(target)

    code, output, opened = verify_opening(out)

    assert code == 5
    assert f"differs: {shard}: a symbolic link, not followed" in output
    assert f"differs: {shard}: its tensors were not checked: a symbolic link" in output
    assert str(target) not in opened


def test_an_index_naming_a_shard_outside_out_is_a_difference_and_is_never_opened(out: Path, tmp_path: Path) -> None:
    shard = first_shard(out)
    target = tmp_path / "outside" / shard
    shutil.copyfile(out / shard, target)
    index = json.loads((out / INDEX_NAME).read_text())
    moved = [name for name, file in index["weight_map"].items() if file == shard]
    index["weight_map"].update(dict.fromkeys(moved, str(target)))
    forge(out, INDEX_NAME, json.dumps(index).encode())

    code, output, opened = verify_opening(out)

    assert code == 5
    assert (
        f"differs: {INDEX_NAME}: tensor {moved[0]!r} is mapped to {str(target)!r}, which is not a file name" in output
    )
    assert str(target) not in opened


def test_a_linked_manifest_is_a_difference_and_is_never_opened(out: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside" / MANIFEST_NAME
    shutil.move(out / MANIFEST_NAME, target)
    (out / MANIFEST_NAME).symlink_to(target)

    code, output, opened = verify_opening(out)

    assert code == 5
    assert f"differs: {MANIFEST_NAME}: a symbolic link, which is never followed" in output
    assert str(target) not in opened


def test_an_extra_hidden_file_or_folder_is_a_difference(out: Path) -> None:
    (out / ".hidden").write_text("added")
    (out / ".cache").mkdir()

    code, output = verify(out)

    assert code == 5
    assert "differs: .cache: a folder (a merge writes only plain files into its folder)" in output
    assert "differs: .hidden: not in the manifest (added after the merge)" in output


# --- item 9: wrong JSON types -----------------------------------------------------------------------------------


MANIFEST_DAMAGE = {
    "files null": (lambda m: m.update(files=None), f"{MANIFEST_NAME}: 'files' is a JSON null, not list"),
    "files a string": (lambda m: m.update(files="x"), f"{MANIFEST_NAME}: 'files' is a JSON string, not list"),
    "files of ints": (lambda m: m.update(files=[1]), f"{MANIFEST_NAME}: files[0] is a JSON integer, not an object"),
    "options a list": (lambda m: m.update(options=[]), f"{MANIFEST_NAME}: 'options' is a JSON list, not object"),
    "sources of ints": (
        lambda m: m.update(sources=[1, 2]),
        f"{MANIFEST_NAME}: sources[0] is a JSON integer, not an object",
    ),
    "a size as text": (
        lambda m: m["files"][0].update(size="12"),
        f"{MANIFEST_NAME}: files[0].size '12' is not a byte count",
    ),
    "not an object": (lambda m: m.clear() or m.update(x=1), f"{MANIFEST_NAME} has no 'files'"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_manifest_of_the_wrong_shape_is_a_named_difference_not_a_traceback(out: Path, damage: str) -> None:
    change, expected = MANIFEST_DAMAGE[damage]
    manifest = manifest_of(out)
    change(manifest)
    save_manifest(out, manifest)

    code, output = verify(out)

    assert code == 5, output
    assert f"differs: {expected}" in output


def test_the_manifest_reader_raises_a_frankenmoe_error_for_a_wrong_shape(out: Path) -> None:
    # `build` treats any FrankenMoEError from the reader as "not up to date".
    save_manifest(out, {**manifest_of(out), "sources": "base"})

    with pytest.raises(ManifestError) as raised:
        read_manifest(out)

    assert isinstance(raised.value, FrankenMoEError)
    assert raised.value.problems == (f"{MANIFEST_NAME}: 'sources' is a JSON string, not list",)
    assert "merge again" in raised.value.message


def test_a_manifest_that_is_not_json_is_a_difference(out: Path) -> None:
    (out / MANIFEST_NAME).write_text("{not json")

    code, output = verify(out)

    assert code == 5
    assert f"differs: {MANIFEST_NAME}: not readable JSON" in output


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ({"weight_map": []}, "no `weight_map` object"),
        ([], "no `weight_map` object"),
        ({"weight_map": {"model.embed_tokens.weight": 3}}, "is mapped to 3, which is not a file name"),
    ],
)
def test_an_index_of_the_wrong_shape_is_a_named_difference_not_a_traceback(
    out: Path, index: Any, expected: str
) -> None:
    forge(out, INDEX_NAME, json.dumps(index).encode())

    code, output = verify(out)

    assert code == 5, output
    assert f"differs: {INDEX_NAME}: " in output and expected in output


def test_a_missing_manifest_is_still_exit_3(out: Path) -> None:
    (out / MANIFEST_NAME).unlink()

    code, output = verify(out)

    assert code == 3
    assert f"has no {MANIFEST_NAME}" in output
