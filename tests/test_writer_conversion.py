"""A source tensor that only changes dtype is converted row block by row block, to the bytes a whole conversion
gives, and an overflow is still refused with the whole tensor's message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frankenmoe.config.parse import load_config
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation, read_tensor
from frankenmoe.io.shards import tensor_bytes
from frankenmoe.merging import writer
from frankenmoe.merging.plan import TensorJob
from frankenmoe.merging.planning import build_plan
from frankenmoe.merging.writer import write_job
from frankenmoe.routers import Gates
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import write_toy_model
from tests.support import write_config


class RecordingSink:
    """Every write the writer makes for one tensor, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write_bytes(self, data: memoryview | bytes) -> None:
        self.writes.append(bytes(data))

    def copy_bytes(self, location: TensorLocation) -> None:
        self.writes.append(tensor_bytes(read_tensor(location)).tobytes())


def embedding_job(tmp_path: Path, base: Path, dtype: str) -> TensorJob:
    config = write_config(tmp_path / "moe.yaml", base, (base, base), dtype=dtype, gate_mode="random")
    source = load_source(str(base))
    plan = build_plan(load_config(config), source, (source, source))
    return next(job for job in plan.jobs if job.name == "model.embed_tokens.weight")


def no_gates() -> Gates:
    raise AssertionError("an embedding needs no router")


def test_a_dtype_change_is_written_in_blocks_with_the_whole_conversions_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_toy_model(tmp_path / "base")  # float32
    job = embedding_job(tmp_path, base, "bfloat16")
    (piece,) = job.pieces
    columns = piece.location.shape[-1]
    monkeypatch.setattr(writer, "MERGE_BLOCK_BYTES", 3 * columns * 4)  # three rows of float32 per block
    sink = RecordingSink()
    write_job(sink, job, no_gates, "random", torch.device("cpu"))
    whole = read_tensor(piece.location).to(torch.bfloat16)
    assert b"".join(sink.writes) == tensor_bytes(whole).tobytes()
    assert len(sink.writes) == -(-piece.location.shape[0] // 3)
    assert max(len(write) for write in sink.writes) == 3 * columns * 2


def test_a_conversion_that_overflows_is_refused_with_the_whole_tensors_count(tmp_path: Path) -> None:
    base = write_toy_model(tmp_path / "base")
    job = embedding_job(tmp_path, base, "float16")
    (piece,) = job.pieces
    values = read_tensor(piece.location)
    values[2, :5] = 1e6  # beyond float16's range: five values become infinite
    with piece.location.file.open("r+b") as handle:
        handle.seek(piece.location.start)
        handle.write(tensor_bytes(values))
    with pytest.raises(ModelError, match=r"model.embed_tokens.weight would hold 5 NaN or infinite value\(s\) of"):
        write_job(RecordingSink(), job, no_gates, "random", torch.device("cpu"))
