"""Writing one GGUF file from a merge plan, for llama.cpp, Ollama and LM Studio.

The GGUF holds what llama.cpp's `convert_hf_to_gguf.py` writes from the safetensors output of the same
plan at the same type, tensor for tensor and bit for bit (tests/test_gguf_output.py compares them):
each tensor is first made exactly as the safetensors writer makes it (in the plan's dtype), then
encoded as the converter's `gguf.quants.quantize` encodes its float32 values: F32/F16/BF16 and Q8_0 by
torch code that gives the same bits (tests/test_gguf_encoding.py), the legacy quants by the gguf package
itself. Routed experts are stacked per layer into `blk.N.ffn_{gate,up,down}_exps`, Llama's query/key
rows are permuted as llama.cpp's rope pairs them, norms, biases, routers and shared-expert gates stay
float32, and a tensor whose rows do not split into the type's blocks falls back to float16 (the dry run
lists which).

Writing is two-phase and streamed: every tensor is declared first (name, shape, type, size: GGUF puts
the tensor table before the data), then each tensor is produced, encoded and written a block of
rows at a time (at most ROW_BLOCK_BYTES of float32), so memory stays bounded whatever the model's
size; producing, encoding (on `slice_workers` threads) and writing (on the file's own thread)
overlap. The file's sha256 is computed from the bytes as they are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from frankenmoe.architectures.gguf import rope_parameters
from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.errors import ModelError, OutputError
from frankenmoe.io.gguf_blocks import encode_rows
from frankenmoe.io.safetensors import DTYPES, read_rows
from frankenmoe.io.shards import WRITEBACK_BYTES, start_writeback, write_error
from frankenmoe.merging.gguf_plan import GgufPlan, GgufTensor
from frankenmoe.merging.plan import TensorJob
from frankenmoe.merging.writer import produce_piece
from frankenmoe.routers.request import Gates

if TYPE_CHECKING:
    import gguf

ROW_BLOCK_BYTES = 4 * 1024 * 1024
"""Float32 bytes of one tensor's rows produced, encoded and written at a time: a few MiB stay in the CPU's cache
(16 MiB blocks cost a third more CPU time and 50 MB more memory on the small benchmark shape)."""


def _metadata(writer: gguf.GGUFWriter, gplan: GgufPlan) -> None:
    """The keys llama.cpp's converter writes for this architecture, from the output's config.json."""
    import gguf

    config = gplan.config
    arch = gplan.architecture
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(gplan.name)
    writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    rope = rope_parameters(config)
    rope_type = str(rope.get("rope_type", "default")).lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3"):
        raise ModelError(
            f"The base model's rope scaling {rope_type!r} is not one frankenmoe writes to GGUF (default, linear, yarn, "
            "llama3). Write safetensors (leave --format out) and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(int(config[gplan.output.expert_count_key]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    writer.add_file_type(gplan.type.file_type)
    if arch.writes_vocab_size:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(
            int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        )
    expert_writers = (writer.add_expert_feed_forward_length, writer.add_expert_shared_feed_forward_length)
    for key, add in zip(arch.expert_length_keys, expert_writers, strict=False):
        if config.get(key) is not None:
            add(int(config[key]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocabulary = gplan.vocabulary
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.token_types)
    vocabulary.special.add_to_gguf(writer, quiet=True)


def write_gguf(
    gplan: GgufPlan,
    gates: Callable[[], Gates],
    path: Path,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write the GGUF file at `path`: declare every tensor, then stream them one by one; the file's record.

    Three stages overlap: this thread produces each tensor's rows a block at a time, the encoding
    workers (one intra-op thread each, as many as `slice_workers`) turn blocks into the type's bytes,
    and the file's own thread writes and hashes them in order. At most QUEUED_BLOCKS blocks wait.
    """
    import gguf
    from gguf.gguf_writer import WriterState

    from frankenmoe.decoder.slices import slice_workers

    device = device or torch.device("cpu")
    writer = gguf.GGUFWriter(path=None, arch=gplan.architecture.name)
    for tensor in gplan.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.tensor_type
        )
    _metadata(writer, gplan)
    output = _StreamedFile(path)
    workers = slice_workers()
    try:
        with ThreadPoolExecutor(workers, "frankenmoe-gguf", initializer=torch.set_num_threads, initargs=(1,)) as pool:
            writer.fout = [output]  # type: ignore[list-item]  # GGUFWriter only writes, tells and flushes
            writer.state = WriterState.EMPTY
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            alignment = writer.data_alignment
            for tensor in gplan.tensors:
                output.write(bytes(-output.tell() % alignment))
                block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
                values = 0
                for rows in _tensor_rows(tensor, gates, device):
                    values += rows.numel()
                    encoded = pool.submit(encode_rows, rows, tensor.tensor_type)
                    output.write_later(encoded, rows.numel() // block * block_bytes)
                if values != math.prod(tensor.shape):
                    raise OutputError(
                        f"Writing {tensor.name} produced {values} values, its declared shape {list(tensor.shape)} "
                        f"holds {math.prod(tensor.shape)}."
                    )
                if progress is not None:
                    progress(tensor.nbytes)
            output.write(bytes(-output.tell() % alignment))
            digest = output.close()
    finally:
        output.abort()
    return FileRecord(path.name, path.stat().st_size, digest)


QUEUED_BLOCKS = 4
"""Encoded (or encoding) blocks that may wait for the file's thread: a few tens of MiB at most."""


class _StreamedFile:
    """The GGUF file, written and sha256-hashed in order on a thread of its own.

    os.write and hashlib release the GIL, so writing and hashing overlap producing and encoding the
    next blocks. `write` hands over bytes the caller no longer changes; `write_later` the future of an
    encoding, written once it is done. Written bytes are sent to the disk as they accumulate
    (`start_writeback`), so the final fsync has little left to do.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            raise OutputError(f"Cannot create {path}: {error.strerror or error}.") from None
        self._queue: queue.Queue[tuple[bytes | bytearray | Future[torch.Tensor], int] | None] = queue.Queue(
            QUEUED_BLOCKS
        )
        self._hash = hashlib.sha256()
        self._position = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="frankenmoe-gguf-write", daemon=True)
        self._thread.start()

    def write(self, data: bytes | bytearray) -> int:
        if data:
            self._put(data, len(data))
        return len(data)

    def write_later(self, encoded: Future[torch.Tensor], size: int) -> None:
        """Queue an encoding that will make `size` bytes (the thread checks it does)."""
        self._put(encoded, size)

    def tell(self) -> int:
        """The file's size once everything queued is written."""
        return self._position

    def flush(self) -> None:
        """Nothing to do: GGUFWriter flushes after its header, and every byte goes out in order anyway."""

    def close(self) -> str:
        """Wait for every queued byte to be written and hashed, fsync the file; its sha256."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        try:
            os.fsync(self._descriptor)
        except OSError as error:
            raise write_error(self.path, error) from None
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop the thread, dropping what still waits, and close the file; harmless after `close`."""
        if self._thread.is_alive():
            self._error = self._error or OutputError(f"Writing {self.path} was abandoned.")
            with contextlib.suppress(queue.Empty):
                while True:  # make room for the stop signal
                    self._queue.get_nowait()
            self._queue.put(None)
            self._thread.join()
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _put(self, item: bytes | bytearray | Future[torch.Tensor], size: int) -> None:
        self._raise_error()
        self._queue.put((item, size))
        self._position += size

    def _raise_error(self) -> None:
        if isinstance(self._error, OSError):
            raise write_error(self.path, self._error) from None
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        written = flushed = 0
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the producer raises the error at its next write
            data, size = item
            try:
                view = memoryview(data.result().numpy() if isinstance(data, Future) else data).cast("B")
                if len(view) != size:
                    raise OutputError(f"An encoded block of {self.path.name} has {len(view)} bytes, not {size}.")
                while view:
                    count = os.write(self._descriptor, view)
                    self._hash.update(view[:count])
                    view = view[count:]
                written += size
                if written - flushed >= WRITEBACK_BYTES:
                    start_writeback(self._descriptor, flushed, written - flushed)
                    flushed = written
            except BaseException as error:  # raised in the producer's thread
                self._error = error


def _tensor_rows(tensor: GgufTensor, gates: Callable[[], Gates], device: torch.device) -> Iterator[torch.Tensor]:
    """The tensor's rows (seen as a matrix over its last dimension) in the plan's dtype, a bounded block at a time."""
    if tensor.values:
        yield torch.tensor(tensor.values, dtype=torch.float32).reshape(1, -1)
        return
    columns = tensor.shape[-1]
    step = max(1, ROW_BLOCK_BYTES // (columns * 4))
    if tensor.permute_heads is not None:
        whole = torch.cat([block for job in tensor.jobs for block in _job_rows(job, gates, device, step)])
        heads = tensor.permute_heads[1]
        whole = whole.reshape(heads, 2, whole.shape[0] // heads // 2, columns).swapaxes(1, 2).reshape(-1, columns)
        yield from whole.split(step)
        return
    for job in tensor.jobs:
        yield from _job_rows(job, gates, device, step)


def _job_rows(job: TensorJob, gates: Callable[[], Gates], device: torch.device, step: int) -> Iterator[torch.Tensor]:
    """One plan job's rows exactly as the safetensors writer makes them, in the job's dtype."""
    dtype = DTYPES[job.dtype][0]
    columns = job.shape[-1]
    if job.computed is not None:
        rows = gates().rows(job.computed.kind, job.computed.layer)
        yield rows.to(dtype).reshape(-1, columns)
        return
    if job.merged is not None:
        for start in range(0, job.merged.num_rows, step):
            yield job.merged.rows(start, min(start + step, job.merged.num_rows), device).to(dtype).cpu()
        return
    if job.origin == "zeros":
        total = math.prod(job.shape[:-1])
        for start in range(0, total, step):
            yield torch.zeros(min(step, total - start), columns, dtype=dtype)
        return
    for piece in job.pieces:
        if piece.transformed:
            yield from produce_piece(piece, job, device).reshape(-1, columns).split(step)
            continue
        total = math.prod(piece.location.shape[:-1])
        for start in range(0, total, step):
            yield read_rows(piece.location, start, min(start + step, total)).to(dtype)
