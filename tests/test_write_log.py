"""The writer publishes what it has written (WriteLog): each tensor once all its bytes are in its shard, at the
offsets its header gives, and the tensor bytes written so far; ReadAhead follows that count and ends with the log."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from frankenmoe.io import read_ahead
from frankenmoe.io.read_ahead import ReadAhead
from frankenmoe.io.safetensors import TensorLocation, read_header
from frankenmoe.io.shards import ShardEntry, ShardWriter, tensor_bytes
from frankenmoe.io.written import WriteLog


class RecordingLog(WriteLog):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[TensorLocation] = []

    def publish(self, location: TensorLocation) -> None:
        self.published.append(location)
        super().publish(location)


def test_a_shard_writer_publishes_each_tensor_when_complete_at_its_header_offsets(tmp_path: Path) -> None:
    path = tmp_path / "shard.safetensors"
    source = tmp_path / "source.bin"
    source.write_bytes(tensor_bytes(torch.arange(4, dtype=torch.float32)))
    log = RecordingLog()
    entries = [ShardEntry("a", "F32", (3,)), ShardEntry("empty", "F32", (0,)), ShardEntry("b", "F32", (4,))]
    writer = ShardWriter(path, entries, {}, log)
    writer.begin("a")
    writer.write_bytes(tensor_bytes(torch.ones(2)))
    assert log.published == [] and log.wait_past(0) == 8  # two of three values: counted, not yet published
    writer.write_bytes(tensor_bytes(torch.ones(1)))
    writer.begin("empty")
    writer.begin("b")
    writer.copy_bytes(TensorLocation("src", source, "F32", (4,), 0, 16))
    writer.close()
    header = read_header(path)
    assert log.published == [header["a"], header["empty"], header["b"]]
    assert log.wait_past(12) == 28


def test_read_ahead_advises_the_pieces_within_its_window_of_the_writer_and_ends_with_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advised: list[int] = []
    first_advice = threading.Event()

    def record(locations: object) -> None:
        advised.extend(location.start for location in locations)  # type: ignore[attr-defined]
        first_advice.set()

    monkeypatch.setattr(read_ahead, "advise_will_need", record)
    pieces = [
        (offset, TensorLocation(str(offset), tmp_path / "x", "U8", (1,), offset, offset + 1))
        for offset in (0, 100, 1000)
    ]
    log = WriteLog()
    follower = ReadAhead(pieces, log, window=150)
    assert first_advice.wait(10)
    assert advised == [0, 100]  # 1000 is beyond the window until the writer moves on
    log.advance(900)
    log.close()
    follower.join()
    assert advised == [0, 100, 1000]

    stopped = WriteLog()
    waiting = ReadAhead(pieces, stopped, window=10)
    stopped.fail("interrupted")
    waiting.join()  # the writer stopped: the read-ahead ends with pieces left
