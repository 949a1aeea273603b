"""Writing safetensors shards: one tensor at a time, in order, hashed as written, progress published.

A shard's tensor list is known before its first byte is written, so its header goes first and each
tensor's bytes follow, copied from a source file by the kernel where the platform allows it or written
from memory. Every byte goes through a StreamHasher, so a shard's sha256 is known without reading it back.
A writer given a WriteLog (frankenmoe.io.written) publishes each tensor once its bytes are written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from frankenmoe.errors import OutputError
from frankenmoe.io.hashing import HASH_CHUNK_BYTES
from frankenmoe.io.safetensors import TensorLocation, tensor_nbytes
from frankenmoe.io.written import WriteLog

ALIGNMENT = 8
COPY_CHUNK_BYTES = 64 * 1024 * 1024
RANGE_HASH_CHUNK_BYTES = 1024 * 1024
"""What StreamHasher reads back of a kernel-copied range at a time (small enough for the CPU's cache)."""
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF})
WRITEBACK_BYTES = 32 * 1024 * 1024
"""How many newly written bytes of a shard `start_writeback` is asked to send to the disk at a time."""


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
    without reading the output back. With a `log`, each tensor's location is published there once all
    of its bytes are written, and the tensor bytes written so far as they grow (readers behind the
    writer wait on it instead of watching the file).
    """

    def __init__(
        self, path: Path, entries: Sequence[ShardEntry], metadata: dict[str, str], log: WriteLog | None = None
    ) -> None:
        self.path = path
        self._entries = list(entries)
        self._log = log
        self._next = 0
        self._remaining_in_tensor = 0
        self._hasher = StreamHasher()
        self._handle: BinaryIO = _open_for_writing(path)
        self._size = 0
        self._flushed = 0
        header = shard_header(self._entries, metadata)
        self._write(header)
        self._tensor_start = len(header)
        """Where in the file the tensor being written begins."""

    def begin(self, name: str) -> None:
        if self._remaining_in_tensor:
            raise RuntimeError(f"tensor {self._entries[self._next - 1].name} was not completely written")
        expected = self._entries[self._next]
        if expected.name != name:
            raise RuntimeError(f"shard {self.path.name} expected tensor {expected.name}, got {name}")
        if self._next:
            self._tensor_start += self._entries[self._next - 1].nbytes
        self._next += 1
        self._remaining_in_tensor = expected.nbytes
        if not expected.nbytes:
            self._tensor_written(0)

    def write_bytes(self, data: memoryview | bytes) -> None:
        if len(data) > self._remaining_in_tensor:
            raise RuntimeError(f"too many bytes for tensor {self._entries[self._next - 1].name}")
        self._write(data)
        self._tensor_written(len(data))

    def copy_bytes(self, location: TensorLocation) -> None:
        """Copy a source tensor's bytes unchanged, in the kernel where the platform allows it."""
        if location.nbytes > self._remaining_in_tensor:
            raise RuntimeError(f"too many bytes for tensor {self._entries[self._next - 1].name}")
        if location.streamed:
            self._write_streamed(location)
        else:
            try:
                with location.file.open("rb", buffering=0) as source:
                    copy_range(source.fileno(), self._handle.fileno(), location.start, location.nbytes)
            except OSError as error:
                raise write_error(self.path, error) from None
            self._hasher.add_range(location.file, location.start, location.nbytes)
            self._grown(location.nbytes)
        self._tensor_written(location.nbytes)

    def _write_streamed(self, location: TensorLocation) -> None:
        """A Hub shard's tensor read over HTTP straight into this shard, a few MiB at a time."""
        from frankenmoe.io.remote import iter_range

        assert location.remote is not None
        for chunk in iter_range(location.remote, location.start, location.end, location.name):
            self._write(chunk)

    def _tensor_written(self, count: int) -> None:
        """`count` more bytes of the current tensor are in the file: publish them, and the tensor once complete."""
        self._remaining_in_tensor -= count
        if self._log is None:
            return
        self._log.advance(count)
        if not self._remaining_in_tensor:
            entry = self._entries[self._next - 1]
            start = self._tensor_start
            self._log.publish(
                TensorLocation(entry.name, self.path, entry.dtype, entry.shape, start, start + entry.nbytes)
            )

    def close(self) -> str:
        """Flush and fsync the file and wait for its hash; its sha256."""
        if self._next != len(self._entries) or self._remaining_in_tensor:
            raise RuntimeError(f"shard {self.path.name} closed before all tensors were written")
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            return self._hasher.hexdigest()
        except OSError as error:
            raise write_error(self.path, error) from None
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
            raise write_error(self.path, error) from None
        self._hasher.add_bytes(view)
        self._grown(len(view))

    def _grown(self, count: int) -> None:
        # Written bytes go to the disk from here on, not all at the fsync: a shard smaller than the
        # kernel's background-writeback threshold would otherwise be written out only by `close`.
        self._size += count
        if self._size - self._flushed >= WRITEBACK_BYTES:
            start_writeback(self._handle.fileno(), self._flushed, self._size - self._flushed)
            self._flushed = self._size


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
        raise write_error(path, error) from None


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


def write_error(path: Path, error: OSError) -> OutputError:
    if error.errno == errno.ENOSPC:
        return OutputError(f"The disk is full: writing {path} failed. Free some space or choose another output folder.")
    return OutputError(f"Writing {path} failed: {error.strerror or error}.")
