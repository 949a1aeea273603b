"""Matrices applied from the checkpoint file in slices of rows, so a float32 copy of a whole matrix is never made.

Every matrix the streamed decoder multiplies (the four attention projections, the MLP, dense or Mixtral's experts
behind the router, and the language-model head) is applied to every sequence's tokens at once, a slice of rows at a
time: each slice is read once per pass however many sequences there are.

On the CPU the slices of one matrix are spread over `slice_workers()` threads. Each slice is
computed by one thread with one intra-op thread, into that thread's reused buffers, so a result
does not depend on how many workers there are: it is bit for bit the one-worker result.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from frankenmoe.io.safetensors import TensorLocation, element_size, read_rows, read_rows_into
from frankenmoe.sources.lora import LoraDelta
from frankenmoe.sources.trunk import TrunkMerge

SLICE_BYTES = 4 * 1024 * 1024
"""Float32 bytes of a matrix (attention, MLP or language-model head) converted at a time. On the CPU
each worker thread converts into buffers of its own, reused from slice to slice."""
T = TypeVar("T")


def slice_workers() -> int:
    """How many threads matrix slices are spread over: OMP_NUM_THREADS when it is set (the usual way
    to limit a torch program's threads), else every core this process may run on."""
    try:
        requested = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        requested = 0
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _slice_pool() -> ThreadPoolExecutor:
    """The process's slice workers, started on first use; each runs torch with one intra-op thread."""
    count = slice_workers()
    with _pool_lock:
        pool = _pools.get(count)
        if pool is None:
            pool = ThreadPoolExecutor(count, "frankenmoe-slices", initializer=torch.set_num_threads, initargs=(1,))
            _pools[count] = pool
        return pool


def map_slices(function: Callable[[int], T], starts: Sequence[int], device: torch.device) -> list[T]:
    """`function(start)` for every start, in order: on the slice workers for the CPU, else here.

    Each call runs on one thread with one intra-op thread, so the results are the same for any number
    of workers. A call that reads a slice with `MatrixRows.read(..., reuse=True)` may keep nothing
    that points into the slice after it returns (the buffer is its thread's, reused next time).
    """
    if device.type != "cpu":
        return [function(start) for start in starts]
    return list(_slice_pool().map(function, starts))


class _SliceBuffers(threading.local):
    """One worker thread's buffers for a slice: its bytes as read and as float32, grown when needed."""

    raw: torch.Tensor | None = None
    converted: torch.Tensor | None = None

    def float_rows(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `location` in float32, as a view of this thread's buffer."""
        count = (stop - start) * location.shape[-1]
        if self.converted is None or self.converted.numel() < count:
            self.converted = torch.empty(count, dtype=torch.float32)
        if location.dtype == "F32":
            return read_rows_into(location, start, stop, self.converted)
        nbytes = count * element_size(location.dtype)
        if self.raw is None or self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        rows = read_rows_into(location, start, stop, self.raw)
        return self.converted[: rows.numel()].view(rows.shape).copy_(rows)

    def stored_rows(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of `location` in its stored dtype, as a view of this thread's raw buffer."""
        nbytes = (stop - start) * location.shape[-1] * element_size(location.dtype)
        if self.raw is None or self.raw.numel() < nbytes:
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        return read_rows_into(location, start, stop, self.raw)


_slice_buffers = _SliceBuffers()


@dataclass(frozen=True)
class MatrixRows:
    """A block of rows of a checkpoint tensor seen as a matrix: one MLP matrix of one expert.

    With `lora`, the matrix is W + scale * B @ A (a source expert given as model+adapter): each slice
    gets its rows of the delta, so no whole float32 matrix is made here either.
    """

    location: TensorLocation
    first_row: int
    num_rows: int
    lora: LoraDelta | None = None
    merged: TrunkMerge | None = None
    """A merged shared tensor (`shared_weights`): its rows are computed from the base's and experts'."""
    given: torch.Tensor | None = field(default=None, compare=False)
    """The matrix's value given in memory (a laser-reduced matrix, see `StreamedDecoder.forward_layer`'s
    overrides), read instead of the checkpoint's. Not compared: a SliceCache never keeps such a matrix."""

    @classmethod
    def whole(cls, location: TensorLocation, lora: LoraDelta | None = None) -> MatrixRows:
        return cls(location, 0, location.shape[0], lora)

    @classmethod
    def of_tensor(cls, location: TensorLocation, value: torch.Tensor) -> MatrixRows:
        """The matrix at `location` with `value` (same shape) in place of its stored one."""
        return cls(location, 0, location.shape[0], given=value)

    @classmethod
    def of_merge(cls, merged: TrunkMerge) -> MatrixRows:
        return cls(merged.base, 0, merged.num_rows, merged=merged)

    @property
    def slice_starts(self) -> range:
        """First row of each slice that `read` returns, SLICE_BYTES of float32 at most (one row at least)."""
        return range(0, self.num_rows, max(1, SLICE_BYTES // (self.location.shape[-1] * 4)))

    def read(self, start: int, device: torch.device, reuse: bool = False) -> torch.Tensor:
        """The slice of this block that begins at row `start` (one of `slice_starts`), in float32.

        With `reuse` on the CPU, the slice is a view of the calling thread's slice buffer, valid until
        that thread reads its next slice (see `map_slices`); otherwise it is a tensor of its own.
        """
        stop = min(start + self.slice_starts.step, self.num_rows)
        if self.given is not None:
            return self.given[self.first_row + start : self.first_row + stop].to(device=device, dtype=torch.float32)
        if self.merged is not None:
            return self.merged.rows(self.first_row + start, self.first_row + stop, device)
        if reuse and device.type == "cpu":
            rows = _slice_buffers.float_rows(self.location, self.first_row + start, self.first_row + stop)
        else:
            rows = read_rows(self.location, self.first_row + start, self.first_row + stop).to(device).float()
        if self.lora is not None:
            rows += self.lora.rows(self.first_row + start, self.first_row + stop, device)
        return rows


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16), with which torch
    multiplies bfloat16 matrices directly, accumulating in float32. Read from Linux's /proc/cpuinfo;
    False where that cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class SliceCache:
    """How a pass gets its matrix slices: kept from pass to pass up to `budget` bytes in all, and with
    `native_bfloat16` multiplied in bfloat16 where the matrix is stored in bfloat16.

    Text generation (router.continuation_tokens) streams the whole model once per token: with a
    budget, the slices read in the first step are kept and the later steps only multiply. A cached
    slice is the very tensor a read would give, so results are the same with or without it; past the
    budget, slices are read as usual. See `weight_cache_bytes` in GateRequest.

    With `native_bfloat16` (text generation on a CPU with bfloat16 matrix units, see
    `cpu_multiplies_bfloat16`), a bfloat16 slice is multiplied as stored, by the tokens rounded to
    bfloat16, with float32 accumulation: no float32 copy of the slice is made, and half the bytes go
    through memory. The products differ from float32 ones by bfloat16 rounding, which can change a
    greedy token where two are nearly tied; they are the same from run to run on one machine (one
    thread per slice), but another CPU's bfloat16 kernels may round differently.
    """

    def __init__(self, budget: int = 0, native_bfloat16: bool = False) -> None:
        self.budget = budget
        self.native_bfloat16 = native_bfloat16
        self.used = 0
        self._slices: dict[object, torch.Tensor] = {}
        self._lock = threading.Lock()

    def multiplies_natively(self, matrix: MatrixRows, device: torch.device) -> bool:
        """Whether `matrix`'s slices are multiplied in their stored bfloat16 (see the class docstring)."""
        return (
            self.native_bfloat16
            and device.type == "cpu"
            and matrix.location.dtype == "BF16"
            and matrix.lora is None
            and matrix.merged is None
            and matrix.given is None
        )

    def slice(self, matrix: MatrixRows, start: int, device: torch.device) -> torch.Tensor:
        """Slice `start` of `matrix` (float32, or bfloat16 where `multiplies_natively`): kept, newly
        kept, or (past the budget) read into the calling thread's reused buffer."""
        native = self.multiplies_natively(matrix, device)
        if matrix.given is not None:  # already in memory, and not told apart from the stored matrix by its key
            return matrix.read(start, device)
        key = (matrix, start)
        try:
            with self._lock:
                cached = self._slices.get(key)
        except TypeError:  # a matrix whose parts cannot be hashed is never kept
            return self._read(matrix, start, device, native, reuse=True)
        if cached is not None:
            return cached
        rows = min(slice_starts(matrix, device, self).step, matrix.num_rows - start)
        nbytes = rows * matrix.location.shape[-1] * (2 if native else 4)
        with self._lock:
            fits = self.used + nbytes <= self.budget
            if fits:
                self.used += nbytes
        if not fits:
            return self._read(matrix, start, device, native, reuse=True)
        value = self._read(matrix, start, device, native, reuse=False)
        with self._lock:
            self._slices[key] = value
        return value

    @staticmethod
    def _read(matrix: MatrixRows, start: int, device: torch.device, native: bool, reuse: bool) -> torch.Tensor:
        if not native:
            return matrix.read(start, device, reuse=reuse)
        step = 2 * matrix.slice_starts.step  # see slice_starts
        first, stop = matrix.first_row + start, matrix.first_row + min(start + step, matrix.num_rows)
        return (
            _slice_buffers.stored_rows(matrix.location, first, stop)
            if reuse
            else read_rows(matrix.location, first, stop)
        )


def slice_starts(matrix: MatrixRows, device: torch.device, cache: SliceCache | None) -> range:
    """The first row of each slice a pass multiplies: `matrix.slice_starts`, or where the slices are
    multiplied as stored bfloat16 (SliceCache), twice as many rows: the same bytes per slice, half the
    reads and hand-offs (about 12% faster at 7B's shape on 2 cores)."""
    if cache is not None and cache.multiplies_natively(matrix, device):
        return range(0, matrix.num_rows, 2 * matrix.slice_starts.step)
    return matrix.slice_starts


def _float_slice(matrix: MatrixRows, start: int, device: torch.device, cache: SliceCache | None) -> torch.Tensor:
    return matrix.read(start, device, reuse=True) if cache is None else cache.slice(matrix, start, device)


def slice_product(
    tokens: torch.Tensor, matrix: MatrixRows, start: int, device: torch.device, cache: SliceCache | None
) -> torch.Tensor:
    """tokens [N, in] @ slice `start` of `matrix`.T, in float32 (see SliceCache for bfloat16 products)."""
    if cache is not None and cache.multiplies_natively(matrix, device):
        return (tokens.to(torch.bfloat16) @ cache.slice(matrix, start, device).T).float()
    return tokens @ _float_slice(matrix, start, device, cache).T


def sliced_linear(
    tokens: torch.Tensor, matrix: MatrixRows, bias: torch.Tensor | None = None, cache: SliceCache | None = None
) -> torch.Tensor:
    """tokens [N, in] @ matrix.T (+ bias): [N, rows], one row slice of the matrix at a time."""
    device = tokens.device

    def rows(start: int) -> torch.Tensor:
        return slice_product(tokens, matrix, start, device, cache)

    output = torch.cat(map_slices(rows, slice_starts(matrix, device, cache), device), dim=-1)
    return output if bias is None else output + bias
