"""Safetensors at the byte level: headers, reading one tensor, and the streaming shard writer."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from frankenmoe.errors import ModelError, OutputError
from frankenmoe.io.safetensors import read_header, read_tensor
from frankenmoe.io.shards import ALIGNMENT, ShardEntry, ShardWriter, StreamHasher, shard_header, tensor_bytes


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(3, 5, generator=generator),
        "b.weight": torch.randn(7, generator=generator).to(torch.bfloat16),
        "c.weight": torch.randn(2, 2, 2, generator=generator).to(torch.float16),
        "d.steps": torch.arange(4, dtype=torch.int64),
    }


def entries_for(tensors: dict[str, torch.Tensor]) -> list[ShardEntry]:
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    return [ShardEntry(name, names[tensor.dtype], tuple(tensor.shape)) for name, tensor in tensors.items()]


def write_with_shard_writer(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    writer = ShardWriter(path, entries_for(tensors), {"format": "pt"})
    for name, tensor in tensors.items():
        writer.begin(name)
        writer.write_bytes(tensor_bytes(tensor))
    writer.close()


def test_shard_header_round_trips_through_read_header(tmp_path: Path) -> None:
    entries = entries_for(sample_tensors())
    header = shard_header(entries, {"format": "pt"})
    data_size = sum(entry.nbytes for entry in entries)
    path = tmp_path / "header-only.safetensors"
    path.write_bytes(header + bytes(data_size))

    (length,) = struct.unpack("<Q", header[:8])
    locations = read_header(path)

    assert length == len(header) - 8
    assert length % ALIGNMENT == 0
    assert json.loads(header[8:])["__metadata__"] == {"format": "pt"}
    assert list(locations) == [entry.name for entry in entries]
    offset = len(header)
    for entry in entries:
        location = locations[entry.name]
        assert (location.dtype, location.shape) == (entry.dtype, entry.shape)
        assert (location.start, location.end) == (offset, offset + entry.nbytes)
        assert location.file == path
        offset += entry.nbytes


def test_shard_writer_output_loads_in_safetensors_with_equal_values(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "written.safetensors"
    write_with_shard_writer(path, tensors)

    loaded = load_file(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()

    assert list(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert metadata == {"format": "pt"}


def test_read_header_and_read_tensor_parse_a_file_written_by_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "reference.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})

    locations = read_header(path)

    assert set(locations) == set(tensors)
    for name, tensor in tensors.items():
        assert locations[name].shape == tuple(tensor.shape)
        assert locations[name].nbytes == tensor.numel() * tensor.element_size()
        value = read_tensor(locations[name])
        assert value.dtype == tensor.dtype
        assert torch.equal(value, tensor)


def test_read_tensor_returns_a_writable_copy(tmp_path: Path) -> None:
    path = tmp_path / "one.safetensors"
    save_file({"x": torch.ones(4)}, path)
    location = read_header(path)["x"]

    value = read_tensor(location)
    value += 1

    assert torch.equal(read_tensor(location), torch.ones(4))


def test_copy_bytes_copies_a_source_tensor_unchanged(tmp_path: Path) -> None:
    source_path = tmp_path / "source.safetensors"
    tensors = sample_tensors()
    save_file(tensors, source_path)
    source = read_header(source_path)
    order = ["c.weight", "a.weight"]
    target = tmp_path / "copy.safetensors"

    writer = ShardWriter(target, [ShardEntry(name, source[name].dtype, source[name].shape) for name in order], {})
    for name in order:
        writer.begin(name)
        writer.copy_bytes(source[name])
    writer.close()

    copied = load_file(target)
    assert list(read_header(target)) == order
    assert all(torch.equal(copied[name], tensors[name]) for name in order)


def test_shard_writer_refuses_tensors_out_of_order(tmp_path: Path) -> None:
    entries = [ShardEntry("first", "F32", (2,)), ShardEntry("second", "F32", (2,))]
    writer = ShardWriter(tmp_path / "order.safetensors", entries, {})

    with pytest.raises(RuntimeError, match="expected tensor first, got second"):
        writer.begin("second")
    writer.abort()


def test_shard_writer_refuses_to_start_a_tensor_before_the_previous_one_is_complete(tmp_path: Path) -> None:
    entries = [ShardEntry("first", "F32", (2,)), ShardEntry("second", "F32", (2,))]
    writer = ShardWriter(tmp_path / "partial.safetensors", entries, {})
    writer.begin("first")
    writer.write_bytes(tensor_bytes(torch.ones(1)))

    with pytest.raises(RuntimeError, match="first was not completely written"):
        writer.begin("second")
    writer.abort()


def test_shard_writer_refuses_too_many_bytes_and_early_close(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "sizes.safetensors", [ShardEntry("only", "F32", (2,))], {})
    writer.begin("only")

    with pytest.raises(RuntimeError, match="too many bytes for tensor only"):
        writer.write_bytes(tensor_bytes(torch.ones(3)))
    with pytest.raises(RuntimeError, match="closed before all tensors were written"):
        writer.close()


def test_shard_writer_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep me")

    with pytest.raises(OutputError, match=r"taken\.safetensors"):
        ShardWriter(existing, [ShardEntry("x", "F32", (1,))], {})
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"), (torch.uint16, "U16")],
)
def test_valid_but_unsupported_dtype_is_named_not_called_damage(tmp_path: Path, dtype: torch.dtype, name: str) -> None:
    path = tmp_path / "quantised.safetensors"
    save_file({"norm.weight": torch.ones(4), "layer.weight": torch.zeros(2, 2).to(dtype)}, path)

    with pytest.raises(ModelError) as caught:
        read_header(path)

    message = caught.value.message
    assert f"Tensor 'layer.weight' in {path} has dtype {name}, which frankenmoe does not support" in message
    assert "It merges weights in BF16, F16, F32, F64" in message
    assert "damaged" not in message


def test_deeply_nested_header_is_a_corrupt_file_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "nested.safetensors"
    header = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)

    with pytest.raises(ModelError) as caught:
        read_header(path)

    assert f"{path} is not a valid safetensors file: its header's JSON is nested too deeply" in caught.value.message
    assert caught.value.exit_code == 3


def test_the_hasher_takes_copied_ranges_without_blocking_but_holds_at_most_two_written_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 64)
    release = threading.Event()
    original = StreamHasher._hash_range

    def stalled(self: StreamHasher, path: Path, start: int, count: int) -> None:
        release.wait()
        original(self, path, start, count)

    monkeypatch.setattr(StreamHasher, "_hash_range", stalled)
    hasher = StreamHasher()
    for start in range(0, 16384, 1024):  # the hasher is stalled on the first range: none of these may wait
        hasher.add_range(source, start, 1024)
    chunks = [b"a" * 10, b"b" * 10, b"c" * 10]
    adding = threading.Thread(target=lambda: [hasher.add_bytes(chunk) for chunk in chunks])
    adding.start()
    adding.join(timeout=0.5)
    assert adding.is_alive(), "a third written chunk was taken while two were waiting"
    release.set()
    adding.join()
    assert hasher.hexdigest() == hashlib.sha256(source.read_bytes() + b"".join(chunks)).hexdigest()


def test_a_shard_is_sent_to_the_disk_range_after_range_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frankenmoe.io import shards as tensor_io

    started: list[tuple[int, int]] = []
    real = tensor_io.start_writeback

    def recording(descriptor: int, start: int, count: int) -> None:
        started.append((start, count))
        real(descriptor, start, count)

    monkeypatch.setattr(tensor_io, "WRITEBACK_BYTES", 64)
    monkeypatch.setattr(tensor_io, "start_writeback", recording)
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    write_with_shard_writer(path, tensors)

    assert len(started) > 1
    assert [start for start, _ in started] == [0, *itertools.accumulate(count for _, count in started[:-1])]
    assert sum(count for _, count in started) > path.stat().st_size - 64
    loaded = load_file(path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
