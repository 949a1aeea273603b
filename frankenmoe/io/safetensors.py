"""Safetensors at the byte level: bounded header parsing, reading one tensor, streaming shard writing.

The file format: 8 bytes little-endian header length N, N bytes of JSON mapping each tensor name to
{dtype, shape, data_offsets: [begin, end]} (offsets relative to the end of the header), then the
raw little-endian tensor bytes. Working at this level lets a merge copy bytes straight from source
files to the output without materialising a tensor, and write a shard one tensor at a time. Tensors in
torch's zip-pickle files are described the same way (frankenmoe.io.pickles), so reading and copying
them takes the same paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import torch

from frankenmoe.errors import ModelError, OutputError

if TYPE_CHECKING:
    from frankenmoe.io.remote import RemoteFile

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_GROWING_BYTES = 2**62
"""What `read_growing_header` lets a file's data section grow to."""
COPY_CHUNK_BYTES = 64 * 1024 * 1024
HASH_CHUNK_BYTES = 8 * 1024 * 1024
RANGE_HASH_CHUNK_BYTES = 1024 * 1024
"""What StreamHasher reads back of a kernel-copied range at a time (small enough for the CPU's cache)."""
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF})
ALIGNMENT = 8

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
    locations = _read_header(path, growing=False)
    assert locations is not None
    return locations


def read_growing_header(path: Path) -> dict[str, TensorLocation] | None:
    """The header of a safetensors file another thread is still writing, None until the header is
    complete. Tensors are not checked against the file's size, which grows as they are written; a
    tensor's bytes are there once the file is at least `location.end` bytes long."""
    return _read_header(path, growing=True)


def _read_header(path: Path, growing: bool) -> dict[str, TensorLocation] | None:
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8 and growing:
                return None
            if len(prefix) < 8:
                raise _corrupt(path, f"it is {file_size} bytes long, too short to hold a header")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES:
                raise _corrupt(path, f"its header claims {header_length} bytes (the limit is {MAX_HEADER_BYTES})")
            if 8 + header_length > file_size and growing:
                return None
            if 8 + header_length > file_size:
                raise _corrupt(
                    path,
                    f"its header claims {header_length} bytes but the file has only {file_size - 8} after the length",
                )
            raw_header = handle.read(header_length)
    except OSError as error:
        raise ModelError(f"Cannot read {path}: {error.strerror or error}. Check that the file is readable.") from None
    data_start = 8 + header_length
    return parse_header(path, raw_header, data_start, MAX_GROWING_BYTES if growing else file_size - data_start)


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
    torch_dtype, item_size = DTYPES[location.dtype]
    columns = location.shape[-1]
    stop = min(stop, math.prod(location.shape[:-1]))
    row_bytes = columns * item_size
    count = (stop - start) * row_bytes
    buffer = bytearray(count)
    _read_exactly(location, memoryview(buffer), location.start + start * row_bytes)
    return torch.frombuffer(buffer, dtype=torch_dtype).reshape(stop - start, columns)


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


READ_AHEAD_BYTES = 512 * 1024 * 1024
"""How far ahead of the writer `ReadAhead` asks for source bytes."""


class ReadAhead:
    """Keeps the kernel reading the source bytes a writer will copy next, about `window` bytes ahead of it.

    `pieces` are (output offset, source tensor): where in the output each source tensor's bytes go; the
    writer's position is the total size of `outputs`, the files it writes one after the other. A thread
    advises each piece (`advise_will_need`) once the writer is less than `window` bytes before it, so
    from a cold page cache the next tensors, often in other files, are being read while the current one
    is copied; the window bounds what the hints can add to the page cache.
    """

    POLL_SECONDS = 0.01

    def __init__(
        self, pieces: Sequence[tuple[int, TensorLocation]], outputs: Sequence[Path], window: int = READ_AHEAD_BYTES
    ) -> None:
        self._pieces = sorted(pieces, key=lambda piece: piece[0])
        self._outputs = list(outputs)
        self._window = window
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frankenmoe-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while index < len(self._pieces) and not self._stop.is_set():
            horizon = self._written() + self._window
            start = index
            while index < len(self._pieces) and self._pieces[index][0] < horizon:
                index += 1
            advise_will_need(location for _, location in self._pieces[start:index])
            if index == start:
                self._stop.wait(self.POLL_SECONDS)

    def _written(self) -> int:
        total = 0
        for path in self._outputs:
            try:
                total += path.stat().st_size
            except OSError:
                break  # not begun yet (or removed: then the writer has stopped and so will this)
        return total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass(frozen=True)
class ShardEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def shard_header(entries: Sequence[ShardEntry], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a shard holding `entries` in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


class StreamHasher:
    """The sha256 of a file's bytes in the order they are written, computed on a thread of its own.

    Bytes copied by the kernel never pass through Python, so their source range is read back (from
    the page cache the copy just filled) and hashed there; written bytes are handed over as a copy.
    hashlib releases the GIL, so hashing overlaps the writer's work. A range is a path and two
    numbers, so any number of them may wait and the writer never waits for the hasher to copy on;
    of the handed-over chunks of 8 MiB, at most two wait at a time.

        >>> hasher = StreamHasher(); hasher.add_bytes(b"abc"); hasher.hexdigest()[:8]
        'ba7816bf'
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | tuple[Path, int, int] | None] = queue.Queue()
        self._chunks = threading.BoundedSemaphore(2)
        self._digest = hashlib.sha256()
        self._error: OSError | None = None
        self._range_buffer: memoryview | None = None
        self._thread = threading.Thread(target=self._run, name="frankenmoe-hash", daemon=True)
        self._thread.start()

    def add_bytes(self, data: memoryview | bytes) -> None:
        # Copied in chunks, so what waits in the queue stays a few MiB whatever the tensor's size.
        view = memoryview(data).cast("B")
        for start in range(0, len(view), HASH_CHUNK_BYTES):
            self._chunks.acquire()
            self._queue.put(bytes(view[start : start + HASH_CHUNK_BYTES]))

    def add_range(self, path: Path, start: int, count: int) -> None:
        self._queue.put((path, start, count))

    def hexdigest(self) -> str:
        """Wait for every handed-over byte to be hashed; the file's sha256 as hex."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    if isinstance(item, bytes):
                        self._digest.update(item)
                    else:
                        self._hash_range(*item)
            except OSError as error:
                self._error = error
            finally:
                if isinstance(item, bytes):
                    self._chunks.release()

    def _hash_range(self, path: Path, start: int, count: int) -> None:
        # One small buffer, read into again and again: it stays in the CPU's cache between the copy
        # and the hash, and costs no allocation (a fresh 8 MiB bytes object per chunk was a new
        # zero-filled mapping each time: about a tenth of the hashing thread's time).
        if self._range_buffer is None:
            self._range_buffer = memoryview(bytearray(RANGE_HASH_CHUNK_BYTES))
        buffer = self._range_buffer
        with path.open("rb", buffering=0) as handle:
            while count:
                filled = os.preadv(handle.fileno(), [buffer[: min(count, len(buffer))]], start)
                if not filled:
                    raise OSError(errno.EIO, f"{path} ended while its bytes were being hashed")
                self._digest.update(buffer[:filled])
                start, count = start + filled, count - filled


class ShardWriter:
    """Writes one shard whose tensor list is known in advance, one tensor at a time, in order.

    Every byte written goes through a StreamHasher, so `close` gives the finished file's sha256
    without reading the output back.
    """

    def __init__(self, path: Path, entries: Sequence[ShardEntry], metadata: dict[str, str]) -> None:
        self.path = path
        self._entries = list(entries)
        self._next = 0
        self._remaining_in_tensor = 0
        self._hasher = StreamHasher()
        self._handle: BinaryIO = _open_for_writing(path)
        self._size = 0
        self._flushed = 0
        self._write(shard_header(self._entries, metadata))

    def begin(self, name: str) -> None:
        if self._remaining_in_tensor:
            raise RuntimeError(f"tensor {self._entries[self._next - 1].name} was not completely written")
        expected = self._entries[self._next]
        if expected.name != name:
            raise RuntimeError(f"shard {self.path.name} expected tensor {expected.name}, got {name}")
        self._next += 1
        self._remaining_in_tensor = expected.nbytes

    def write_bytes(self, data: memoryview | bytes) -> None:
        if len(data) > self._remaining_in_tensor:
            raise RuntimeError(f"too many bytes for tensor {self._entries[self._next - 1].name}")
        self._remaining_in_tensor -= len(data)
        self._write(data)

    def copy_bytes(self, location: TensorLocation) -> None:
        """Copy a source tensor's bytes unchanged, in the kernel where the platform allows it."""
        if location.nbytes > self._remaining_in_tensor:
            raise RuntimeError(f"too many bytes for tensor {self._entries[self._next - 1].name}")
        self._remaining_in_tensor -= location.nbytes
        if location.streamed:
            self._write_streamed(location)
            return
        try:
            with location.file.open("rb", buffering=0) as source:
                copy_range(source.fileno(), self._handle.fileno(), location.start, location.nbytes)
        except OSError as error:
            raise _write_error(self.path, error) from None
        self._hasher.add_range(location.file, location.start, location.nbytes)
        self._grown(location.nbytes)

    def _write_streamed(self, location: TensorLocation) -> None:
        """A Hub shard's tensor read over HTTP straight into this shard, a few MiB at a time."""
        from frankenmoe.io.remote import iter_range

        assert location.remote is not None
        for chunk in iter_range(location.remote, location.start, location.end, location.name):
            self._write(chunk)

    def close(self) -> str:
        """Flush and fsync the file and wait for its hash; its sha256."""
        if self._next != len(self._entries) or self._remaining_in_tensor:
            raise RuntimeError(f"shard {self.path.name} closed before all tensors were written")
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            return self._hasher.hexdigest()
        except OSError as error:
            raise _write_error(self.path, error) from None
        finally:
            self._handle.close()

    def abort(self) -> None:
        self._handle.close()
        with contextlib.suppress(OSError):
            self._hasher.hexdigest()

    def _write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            _write_all(self._handle.fileno(), view)
        except OSError as error:
            raise _write_error(self.path, error) from None
        self._hasher.add_bytes(view)
        self._grown(len(view))

    def _grown(self, count: int) -> None:
        # Written bytes go to the disk from here on, not all at the fsync: a shard smaller than the
        # kernel's background-writeback threshold would otherwise be written out only by `close`.
        self._size += count
        if self._size - self._flushed >= WRITEBACK_BYTES:
            start_writeback(self._handle.fileno(), self._flushed, self._size - self._flushed)
            self._flushed = self._size


WRITEBACK_BYTES = 32 * 1024 * 1024
"""How many newly written bytes of a shard `start_writeback` is asked to send to the disk at a time."""


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux, or no libc to load
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(descriptor: int, start: int, count: int) -> None:
    """Ask the kernel to start writing this range of a file to disk, without waiting for it
    (Linux's sync_file_range with SYNC_FILE_RANGE_WRITE); elsewhere, nothing happens. The fsync at
    the end still makes the file durable; this only leaves it less to do."""
    function = _sync_file_range()
    if function is not None:
        function(descriptor, start, count, 2)  # SYNC_FILE_RANGE_WRITE; a refusal only loses the head start


def _open_for_writing(path: Path) -> BinaryIO:
    try:
        return path.open("xb", buffering=0)
    except OSError as error:
        raise _write_error(path, error) from None


def _write_all(target_fd: int, data: memoryview) -> None:
    while data:
        written = os.write(target_fd, data)
        data = data[written:]


def copy_range(source_fd: int, target_fd: int, start: int, count: int) -> None:
    """Append `count` bytes of the source file from offset `start` at the target's position: in the
    kernel (`copy_file_range`) where the platform allows it, else through a buffer."""
    offset = start
    remaining = count
    kernel_copy = hasattr(os, "copy_file_range")
    while remaining:
        chunk = min(remaining, COPY_CHUNK_BYTES)
        copied = 0
        if kernel_copy:
            try:
                copied = os.copy_file_range(source_fd, target_fd, chunk, offset)
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                kernel_copy = False
        if copied == 0:
            data = os.pread(source_fd, chunk, offset)
            if not data:
                raise OSError(errno.EIO, f"source ended {remaining} bytes early")
            _write_all(target_fd, memoryview(data))
            copied = len(data)
        offset += copied
        remaining -= copied


def _write_error(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"The disk is full: writing {path} failed. Free some space or choose another output folder.")
    return OutputError(f"Writing {path} failed: {error.strerror or error}.")


SAFETENSORS_TO_CONFIG_DTYPE = {value: key for key, value in CONFIG_DTYPE_TO_SAFETENSORS.items()}


INDEX_NAME = "model.safetensors.index.json"
