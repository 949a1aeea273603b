"""Pickle sources that are damaged, hostile or merely written with a newer pickle protocol.

Each file is a real torch.save archive whose members are then rewritten or patched byte by byte, so the
reader meets exactly what a corrupted download or a crafted file would give it.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from frankenmoe.errors import ModelError
from frankenmoe.io import pickle_reader
from frankenmoe.io.pickles import read_pickle_index
from frankenmoe.io.safetensors import read_tensor

STATE = {
    "model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "model.norm.weight": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "lm_head.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3),
}


def _data_pkl_name(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        return next(name for name in archive.namelist() if name.endswith("/data.pkl"))


def _with_data_pkl(path: Path, data: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    """Replace the data.pkl of the torch archive at `path` (every other member is kept as it was)."""
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, member in members:
            is_pickle = name.endswith("/data.pkl")
            archive.writestr(name, data if is_pickle else member, compress_type=compression if is_pickle else 0)


def _patch_headers(path: Path, member: str, field: str, value: int) -> None:
    """Set a field of `member`'s local and central zip headers: 'flags' or 'method' (both 2 bytes)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(member).header_offset
    central = raw.index(b"PK\x01\x02" + bytes(raw[local + 4 : local + 6]))
    while raw[central + 46 : central + 46 + len(member)] != member.encode():
        central = raw.index(b"PK\x01\x02", central + 4)
    local_offset, central_offset = {"flags": (6, 8), "method": (8, 10)}[field]
    struct.pack_into("<H", raw, local + local_offset, value)
    struct.pack_into("<H", raw, central + central_offset, value)
    path.write_bytes(bytes(raw))


# --- item 12: pickle protocols 4 and 5 ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_state_dicts_saved_with_any_binary_pickle_protocol_are_read(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(STATE, path, pickle_protocol=protocol)
    if protocol > 2:
        with zipfile.ZipFile(path) as archive:
            assert b"\x93" in archive.read(_data_pkl_name(path))  # STACK_GLOBAL names the globals

    locations = read_pickle_index(path)

    assert sorted(locations) == sorted(STATE)
    for name, tensor in STATE.items():
        assert torch.equal(read_tensor(locations[name]), tensor), name


class _CallsMkdir:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def test_a_global_named_through_stack_global_is_refused_unless_it_builds_tensors(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": _CallsMkdir(marker)}, path, pickle_protocol=4)

    with pytest.raises(ModelError) as caught:
        read_pickle_index(path)

    assert f"asks its unpickler for {os.mkdir.__module__}.mkdir, which is not a tensor" in caught.value.message
    assert not marker.exists()


def test_stack_global_whose_operands_are_not_strings_is_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    # PROTO 4, two ints, STACK_GLOBAL, STOP.
    _with_data_pkl(path, b"\x80\x04K\x01K\x02\x93.")

    with pytest.raises(ModelError) as caught:
        read_pickle_index(path)

    assert "is not a valid torch weights file: its data.pkl cannot be read as a state dict" in caught.value.message
    assert "STACK_GLOBAL needs two strings" in caught.value.message


# --- item 10: damaged zip members ------------------------------------------------------------------------------------


def _bad_deflate(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        pickle_bytes = archive.read(_data_pkl_name(path))
    _with_data_pkl(path, pickle_bytes, zipfile.ZIP_DEFLATED)
    name = _data_pkl_name(path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(name.encode())
    start += struct.unpack_from("<H", raw, info.header_offset + 28)[0]
    # A deflate block header with BTYPE 11 ("reserved"): no inflater accepts it.
    raw[start : start + info.compress_size] = b"\xff" * info.compress_size
    path.write_bytes(bytes(raw))


def _unknown_method(path: Path) -> None:
    _patch_headers(path, _data_pkl_name(path), "method", 97)


def _encrypted(path: Path) -> None:
    _patch_headers(path, _data_pkl_name(path), "flags", 0x1)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_bad_deflate, "cannot be decompressed"),
        (_unknown_method, "uses a compression method that cannot be read"),
        (_encrypted, "is flagged as encrypted, which torch.save never does"),
    ],
    ids=["bad-deflate", "unknown-method", "encrypted"],
)
def test_a_damaged_data_pkl_member_is_reported_as_a_corrupt_file(
    tmp_path: Path, damage: Callable[[Path], None], fragment: str
) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(STATE, path)
    damage(path)

    with pytest.raises(ModelError) as caught:
        read_pickle_index(path)

    assert caught.value.message.startswith(f"{path} is not a valid torch weights file: its ")
    assert fragment in caught.value.message
    assert "download or convert it again" in caught.value.message


# --- item 11: memory amplification -----------------------------------------------------------------------------------


def _tensor_bomb(count: int) -> bytes:
    """A one-tensor state dict whose pickle then rebuilds `count` more tensors, 5 bytes each."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        body = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    # torch.save memoizes _rebuild_tensor_v2 as 2 and the tensor's argument tuple as 12: BINGET both, REDUCE.
    assert body[-2:] == b"s."
    return body[:-2] + b"h\x02h\x0cR" * count + body[-2:]


BOMBS = {
    "mark": b"\x80\x02" + b"(" * 2_000_000 + b".",
    "empty-list": b"\x80\x02" + b"]" * 2_000_000 + b".",
    "memoize": b"\x80\x04" + b")\x94" * 1_000_000 + b".",
    "tensors": _tensor_bomb(20_000),
}


@pytest.mark.parametrize("body", BOMBS.values(), ids=BOMBS.keys())
def test_a_data_pkl_that_builds_too_much_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    # A smaller budget keeps the test fast; the real one is measured below.
    monkeypatch.setattr(pickle_reader, "PICKLE_BUILD_BUDGET", 16 * 2**20)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    _with_data_pkl(path, body, zipfile.ZIP_DEFLATED)

    with pytest.raises(ModelError) as caught:
        read_pickle_index(path)

    assert "would build more than 16 MiB of objects" in caught.value.message
    assert "crafted to exhaust memory" in caught.value.message


def test_the_budget_admits_a_state_dict_with_thousands_of_tensors(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    state = {
        f"model.layers.{layer}.mlp.experts.{expert}.w.weight": torch.zeros(1)
        for layer in range(40)
        for expert in range(100)
    }
    torch.save(state, path)

    assert len(read_pickle_index(path)) == 4000


PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from frankenmoe.errors import ModelError
from frankenmoe.io.pickles import read_pickle_index
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_pickle_index(Path(sys.argv[1]))
    outcome = "read"
except ModelError as error:
    outcome = error.message
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
print(outcome)
"""


@pytest.mark.slow  # merges of models made three times larger, or a 500 MB pickle: seconds each
def test_eight_mib_of_mark_opcodes_costs_at_most_a_few_hundred_mb(tmp_path: Path) -> None:
    # The file: 8 MiB of MARK (8.5 KB deflated) cost 525 MB of RSS before being refused as damaged.
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    _with_data_pkl(path, b"\x80\x02" + b"(" * (8 * 2**20) + b".", zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 20_000

    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=True,
    )
    growth_mb, outcome = result.stdout.splitlines()

    assert "would build more than 256 MiB of objects" in outcome
    # The budget (256 MiB) plus the 8 MiB data.pkl, decoded once.
    assert int(growth_mb) < 320, growth_mb
