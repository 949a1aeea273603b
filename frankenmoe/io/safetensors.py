"""Safetensors at the byte level: the format, bounded header parsing, where a tensor's bytes are, reading them.

The file format: 8 bytes little-endian header length N, N bytes of JSON mapping each tensor name to
{dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the
raw little-endian tensor bytes. Working at this level lets a merge copy bytes straight from source
files to the output without materialising a tensor (writing shards: frankenmoe.io.shards). Tensors in
torch's zip-pickle files are described the same way (frankenmoe.io.pickles), so reading and copying
them takes the same paths.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from frankenmoe.errors import ModelError

if TYPE_CHECKING:
    from frankenmoe.io.remote import RemoteFile

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Valid safetensors dtypes that frankenmoe cannot merge: quantised floats (FP8, FP6, FP4), unsigned and complex.
UNSUPPORTED_DTYPES = frozenset(
    {
        "F8_E4M3",
        "F8_E4M3FNUZ",
        "F8_E5M2",
        "F8_E5M2FNUZ",
        "F8_E8M0",
        "F6_E2M3",
        "F6_E3M2",
        "F4",
        "U16",
        "U32",
        "U64",
        "C64",
    }
)
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
CONFIG_DTYPE_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SAFETENSORS_TO_CONFIG_DTYPE = {value: key for key, value in CONFIG_DTYPE_TO_SAFETENSORS.items()}


WeightFormat = Literal["safetensors", "pickle"]


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's raw little-endian bytes live: in a safetensors file, or a storage of a torch zip pickle."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file_format: WeightFormat = "safetensors"
    remote: RemoteFile | None = None
    """Set for a Hub repo's shard that was not in the cache at planning: while `file` is absent (the merge
    streams its sources), the bytes are read over HTTP (frankenmoe.io.remote)."""

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def streamed(self) -> bool:
        """Whether reading this tensor now goes over HTTP: a Hub shard that was not downloaded."""
        return self.remote is not None and not self.file.is_file()


def element_size(dtype: str) -> int:
    return DTYPES[dtype][1]


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * element_size(dtype)


def read_header(path: Path) -> dict[str, TensorLocation]:
    """Parse and check a safetensors header without trusting any number in it."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it is {file_size} bytes long, too short to hold a header")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"its header claims {header_length} bytes (the limit is {MAX_HEADER_BYTES})")
            if 8 + header_length > file_size:
                raise _corrupt(
                    path,
                    f"its header claims {header_length} bytes but the file has only {file_size - 8} after the length",
                )
            raw_header = handle.read(header_length)
    except OSError as error:
        raise ModelError(f"Cannot read {path}: {error.strerror or error}. Check that the file is readable.") from None
    data_start = 8 + header_length
    return parse_header(path, raw_header, data_start, file_size - data_start)


def parse_header(path: Path, raw_header: bytes, data_start: int, data_size: int) -> dict[str, TensorLocation]:
    """Check a safetensors header's JSON (the bytes after its length) against a data section of `data_size`
    bytes at `data_start`; also used for headers read over HTTP from a Hub repo (frankenmoe.sources.hub)."""
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "its header is not valid JSON") from None
    except RecursionError:
        # A real header nests three levels deep; thousands of levels only come from damage or malice.
        raise _corrupt(path, "its header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    locations: dict[str, TensorLocation] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        locations[name] = _location(path, name, entry, data_start, data_size)
    return locations


def _location(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorLocation:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"the entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype in UNSUPPORTED_DTYPES:
        raise unsupported_dtype(path, str(dtype), name)
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise _corrupt(
            path, f"tensor {name!r} ends at byte {end} of the data section, but the file holds only {data_size} bytes"
        )
    if end - begin != tensor_nbytes(dtype, shape):
        raise _corrupt(
            path, f"tensor {name!r} occupies {end - begin} bytes but its dtype and shape need a different size"
        )
    return TensorLocation(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _corrupt(path: Path, detail: str) -> ModelError:
    return ModelError(
        f"{path} is not a valid safetensors file: {detail}. The file is probably truncated or damaged; "
        "download or convert it again."
    )


def unsupported_dtype(path: Path, dtype: str, name: str | None = None) -> ModelError:
    """A valid file holding tensors of a dtype frankenmoe cannot merge (FP8 and other quantised formats)."""
    subject = f"Tensor {name!r} in {path} has" if name is not None else f"{path} holds tensors of"
    return ModelError(
        f"{subject} dtype {dtype}, which frankenmoe does not support. It merges weights in "
        f"{', '.join(sorted(FLOAT_DTYPES))} (and reads {', '.join(sorted(DTYPES.keys() - FLOAT_DTYPES))} for other "
        "tensors); FP8 and other quantised checkpoints cannot be merged. Use the model's unquantised weights."
    )


def _cut_short(location: TensorLocation) -> ModelError:
    if location.file_format == "pickle":
        return ModelError(
            f"{location.file} is not a valid torch weights file: tensor {location.name!r} is cut short. The file is "
            "probably truncated or damaged; download or convert it again."
        )
    return _corrupt(location.file, f"tensor {location.name!r} is cut short")


def read_tensor(location: TensorLocation) -> torch.Tensor:
    """One tensor, mapped copy-on-write from its file: writable, and private to the caller.

    Mapping instead of reading means only the pages a caller touches are read and resident: looking
    up a few prompt tokens in a 32000-row embedding table costs a few pages, not the whole table.
    """
    torch_dtype = DTYPES[location.dtype][0]
    if location.nbytes == 0:
        return torch.empty(location.shape, dtype=torch_dtype)
    if location.streamed:
        buffer = bytearray(location.nbytes)
        _read_exactly(location, memoryview(buffer), location.start)
        return torch.frombuffer(buffer, dtype=torch_dtype).reshape(location.shape)
    map_start = location.start - location.start % mmap.ALLOCATIONGRANULARITY
    try:
        with location.file.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size < location.end:
                raise _cut_short(location)
            mapped = mmap.mmap(handle.fileno(), location.end - map_start, access=mmap.ACCESS_COPY, offset=map_start)
    except OSError as error:
        raise ModelError(f"Cannot read tensor {location.name!r} from {location.file}: {error}.") from None
    # frombuffer keeps `mapped` alive for as long as the tensor (or a view of it) exists.
    flat = torch.frombuffer(
        mapped, dtype=torch_dtype, count=math.prod(location.shape), offset=location.start - map_start
    )
    return flat.reshape(location.shape)


def read_rows(location: TensorLocation, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of a tensor seen as a matrix [all leading dimensions, last dimension].

    The bytes are read into a fresh buffer: unlike slicing a mapped tensor, this leaves no pages of
    the rest of the tensor resident, so a caller walking a large matrix slice by slice holds one
    slice at a time. Stacked expert tensors [experts, rows, columns] are read as one tall matrix.
    """
    stop = min(stop, math.prod(location.shape[:-1]))
    count = (stop - start) * location.shape[-1] * element_size(location.dtype)
    return read_rows_into(location, start, stop, torch.empty(count, dtype=torch.uint8))


def read_rows_into(location: TensorLocation, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
    """`read_rows`, into the first bytes of `buffer` (a contiguous CPU tensor, large enough) instead of a
    new buffer: the rows are a view of it. Callers reading many slices reuse one buffer, which stays in
    the CPU's caches and costs no allocation or page faults."""
    torch_dtype, item_size = DTYPES[location.dtype]
    columns = location.shape[-1]
    stop = min(stop, math.prod(location.shape[:-1]))
    count = (stop - start) * columns * item_size
    raw = buffer.view(torch.uint8).reshape(-1)[:count]
    if len(raw) < count:
        raise ValueError(f"a buffer of {len(raw)} bytes cannot hold {count}")
    _read_exactly(location, memoryview(raw.numpy()), location.start + start * columns * item_size)
    return raw.view(torch_dtype).reshape(stop - start, columns)


def _read_exactly(location: TensorLocation, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` from `location`'s file at `offset`. A bare descriptor, not a Python file object:
    the passes read thousands of slices, and a file object per read cost seconds of CPU in total."""
    try:
        descriptor = os.open(location.file, os.O_RDONLY)
        try:
            filled = os.preadv(descriptor, [buffer], offset)
        finally:
            os.close(descriptor)
    except FileNotFoundError as error:
        if location.remote is None:
            raise ModelError(f"Cannot read tensor {location.name!r} from {location.file}: {error}.") from None
        from frankenmoe.io.remote import read_into

        read_into(location.remote, offset, buffer, location.name)
        return
    except OSError as error:
        raise ModelError(f"Cannot read tensor {location.name!r} from {location.file}: {error}.") from None
    if filled != len(buffer):
        raise _cut_short(location)


def advise_will_need(locations: Iterable[TensorLocation]) -> None:
    """Ask the kernel to start reading these tensors' bytes into the page cache, without waiting for them
    (POSIX_FADV_WILLNEED). Bytes already cached cost a look-up; where the call is missing, nothing happens."""
    if not hasattr(os, "posix_fadvise"):
        return
    for location in locations:
        try:
            descriptor = os.open(location.file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, location.start, location.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(descriptor)


INDEX_NAME = "model.safetensors.index.json"
