"""Execute a merge plan: stream every tensor into its shard, then the index, config and tokenizer.

The model card is not written here: it shows the routing check, which reads what this writes
(`run.execute_merge` writes it once everything it shows is known).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.errors import ModelError, OutputError
from frankenmoe.io.hashing import file_sha256
from frankenmoe.io.safetensors import DTYPES, INDEX_NAME, TensorLocation, read_header, read_rows, read_tensor
from frankenmoe.io.shards import ShardEntry, ShardWriter, tensor_bytes
from frankenmoe.io.written import WriteLog
from frankenmoe.merging.laser import apply_laser
from frankenmoe.merging.plan import MergePlan, TensorJob, TensorPiece
from frankenmoe.routers.request import Gates
from frankenmoe.sources.trunk import TrunkMerge

NON_FINITE_CHECK = (
    "routers, merged shared tensors and transformed expert tensors were checked and hold no NaN or Inf; "
    "copied tensors keep their source's bytes and were not checked"
)
"""What the writer guarantees about NaN and Inf, recorded in the manifest's options for `verify` to report."""


def write_checkpoint(
    plan: MergePlan,
    gates: Callable[[], Gates],
    folder: Path,
    written: WriteLog,
    device: torch.device | None = None,
    show_progress: bool = False,
) -> dict[str, FileRecord]:
    """Write the checkpoint, all but its model card, into `folder` (which must exist and be empty); every
    file's record.

    `gates` returns the computed rows; it is called only when the first computed tensor is due, so
    the rows may still be computing while the other tensors are copied. Laser's reductions run on
    `device` (the CPU by default). Every file's sha256 is computed from the bytes as they are
    written (shards) or from what was written (the small files), never by reading the output back.
    Each tensor is published in `written` once its bytes are in its shard; the log is closed when the
    shards are written, or failed when writing stops early, so no reader behind the writer waits forever.
    """
    try:
        records = _write_shards(plan, gates, folder, written, device or torch.device("cpu"), show_progress)
    except BaseException as error:
        written.fail(str(error) or type(error).__name__)
        raise
    written.close()
    index = {
        "metadata": {"total_size": plan.output_bytes},
        "weight_map": {job.name: plan.shard_name(job.shard) for job in plan.jobs},
    }
    records[INDEX_NAME] = write_text_file(folder / INDEX_NAME, _json_text(index))
    records["config.json"] = write_text_file(folder / "config.json", _json_text(plan.output_config))
    for source in plan.tokenizer_files:
        try:
            shutil.copyfile(source, folder / source.name)
        except OSError as error:
            raise OutputError(f"Copying {source} into the output failed: {error.strerror or error}.") from None
        records[source.name] = FileRecord(source.name, source.stat().st_size, file_sha256(source))
    return records


def _write_shards(
    plan: MergePlan,
    gates: Callable[[], Gates],
    folder: Path,
    written: WriteLog,
    device: torch.device,
    show_progress: bool,
) -> dict[str, FileRecord]:
    """Every shard, in order; their records."""
    records: dict[str, FileRecord] = {}
    # A shard's fsync and the end of its hash run on a thread of their own while the next shard is
    # written; leaving the block waits for them.
    with (
        tqdm(total=plan.output_bytes, desc="writing", unit="B", unit_scale=True, disable=not show_progress) as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="frankenmoe-fsync") as closer,
    ):
        closing: list[tuple[Path, Future[str]]] = []
        for shard in range(plan.shard_count):
            path = folder / plan.shard_name(shard)
            writer = _write_shard(plan, shard, gates, path, written, bar, device)
            closing.append((path, closer.submit(writer.close)))
        for path, digest in closing:
            records[path.name] = FileRecord(path.name, path.stat().st_size, digest.result())
    return records


def _write_shard(
    plan: MergePlan,
    shard: int,
    gates: Callable[[], Gates],
    path: Path,
    written: WriteLog,
    bar: tqdm,
    device: torch.device,
) -> ShardWriter:
    """Write every tensor of one shard; its writer, for `close` to flush, fsync and hash."""
    jobs = plan.shard_jobs(shard)
    entries = [ShardEntry(job.name, job.dtype, job.shape) for job in jobs]
    writer = ShardWriter(path, entries, {"format": "pt"}, written)
    try:
        for job in jobs:
            writer.begin(job.name)
            write_job(writer, job, gates, plan.config.gate_mode, device)
            bar.update(job.nbytes)
    except BaseException:
        writer.abort()
        raise
    return writer


class TensorSink(Protocol):
    """Where one tensor's bytes go, in order: a shard (ShardWriter), or a file of its own."""

    def write_bytes(self, data: memoryview | bytes) -> None: ...

    def copy_bytes(self, location: TensorLocation) -> None: ...


def write_job(
    sink: TensorSink, job: TensorJob, gates: Callable[[], Gates], gate_mode: str, device: torch.device
) -> None:
    """All of one tensor's bytes, made as the plan says: the one place that makes an output tensor, so
    whatever reads a merge's tensors before or instead of its shards (the routing check of a GGUF
    merge) reads the very bytes the shards hold."""
    if job.computed is not None:
        rows = gates().rows(job.computed.kind, job.computed.layer).to(DTYPES[job.dtype][0])
        if not bool(torch.isfinite(rows).all()):
            raise non_finite_error(
                job.name,
                rows,
                f"the {job.computed.kind.replace('_', ' ')} computed by gate_mode {gate_mode}",
                "The base model's hidden states overflowed, or the trunk they ran on holds NaN or Inf. "
                "Try a smaller router.scale, another gate_mode, or the output dtype float32.",
            )
        sink.write_bytes(tensor_bytes(rows))
    elif job.merged is not None:
        write_merged(sink, job.name, job.merged, DTYPES[job.dtype][0], device)
    elif job.origin == "zeros":
        sink.write_bytes(bytes(job.nbytes))
    for piece in job.pieces:
        if piece.copies_bytes(job.dtype):
            sink.copy_bytes(piece.location)
        elif piece.transformed:
            sink.write_bytes(tensor_bytes(produce_piece(piece, job, device)))
        else:
            write_converted(sink, piece, job, device)


MERGE_BLOCK_BYTES = 4 * 1024 * 1024
"""Float32 bytes of rows held at a time while a shared tensor is merged (per source) or a tensor is converted."""


def write_merged(writer: TensorSink, name: str, merge: TrunkMerge, dtype: torch.dtype, device: torch.device) -> None:
    """A merged shared tensor, row block by row block: memory stays at one block per source."""
    columns = merge.base.shape[-1]
    step = max(1, MERGE_BLOCK_BYTES // (columns * 4))
    for start in range(0, merge.num_rows, step):
        stop = min(start + step, merge.num_rows)
        rows = merge.rows(start, stop, device).to(dtype).cpu()
        if not bool(torch.isfinite(rows).all()):
            raise _non_finite_merge(name, rows, merge, start, stop, dtype)
        writer.write_bytes(tensor_bytes(rows))


def write_converted(sink: TensorSink, piece: TensorPiece, job: TensorJob, device: torch.device) -> None:
    """An untransformed source tensor in the job's dtype, row block by row block: memory stays at one block
    (an embedding matrix converted whole would be the merge's largest allocation). The bytes are those
    `produce_piece` makes, and a block that overflows the output dtype gets its refusal."""
    location, dtype = piece.location, DTYPES[job.dtype][0]
    rows, columns = math.prod(location.shape[:-1]), location.shape[-1]
    step = max(1, MERGE_BLOCK_BYTES // (columns * 4))
    for start in range(0, rows, step):
        block = read_rows(location, start, min(start + step, rows)).to(dtype)
        if not bool(torch.isfinite(block).all()):
            produce_piece(piece, job, device)  # raises unless the source holds these values itself (then kept)
        sink.write_bytes(tensor_bytes(block))


def produce_piece(piece: TensorPiece, job: TensorJob, device: torch.device) -> torch.Tensor:
    """A source tensor with its expert transforms applied, in the job's dtype.

    In float32, in this order: a LoRA adapter's delta (it defines the expert's matrix), laser, noise,
    then the multiplier (residual_scale scales the merged down_proj); the result is cast once. A result
    with NaN or Inf is refused, unless it is an unchanged source tensor's own values in another dtype
    (those are kept, as a copied tensor's bytes are).
    """
    tensor = read_tensor(piece.location)
    if piece.transformed:
        tensor = tensor.float()
        if piece.lora is not None:
            tensor = piece.lora.add_to(tensor)
        tensor = apply_laser(tensor, piece.laser, device)
        if piece.noise_scale:
            generator = torch.Generator().manual_seed(piece.noise_seed)
            tensor += torch.randn(tensor.shape, generator=generator) * piece.noise_scale
        if piece.multiplier is not None:
            tensor *= piece.multiplier
    result = tensor.to(DTYPES[job.dtype][0])
    if not bool(torch.isfinite(result).all()):
        source_finite = bool(torch.isfinite(read_tensor(piece.location)).all())
        if piece.transformed or source_finite:
            raise _non_finite_piece(job, piece, result, source_finite)
    return result


def non_finite_error(name: str, tensor: torch.Tensor, origin: str, advice: str) -> ModelError:
    """The refusal of an output tensor holding NaN or Inf, raised before any of its bytes are written."""
    bad = int((~torch.isfinite(tensor)).sum())
    return ModelError(
        f"Output tensor {name} would hold {bad} NaN or infinite value(s) of {tensor.numel()}: it is {origin}. "
        f"Nothing was written (a model with such values produces NaN for every token that reaches them). {advice}"
    )


def _non_finite_piece(job: TensorJob, piece: TensorPiece, result: torch.Tensor, source_finite: bool) -> ModelError:
    source = f"{piece.location.name!r} of {piece.location.file}"
    if not source_finite:
        return non_finite_error(
            job.name,
            result,
            f"made from source tensor {source}, which itself holds NaN or Inf",
            "Use a source without such values, or leave this expert's noise_scale, residual_scale, laser and "
            "LoRA adapter off so that the tensor is copied unchanged.",
        )
    if piece.lora is not None and not bool(torch.isfinite(piece.lora.add_to(torch.zeros(result.shape))).all()):
        return non_finite_error(
            job.name,
            result,
            f"source tensor {source} plus the LoRA delta from {piece.lora.lora_a.file} "
            f"({piece.lora.lora_a.name!r}, {piece.lora.lora_b.name!r}), and that delta holds NaN or Inf",
            "The adapter is damaged or diverged in training: use another checkpoint of it.",
        )
    steps = ["its LoRA delta"] if piece.lora is not None else []
    if piece.laser is not None and piece.laser.reduces:
        steps.append("laser")
    if piece.noise_scale:
        steps.append(f"noise_scale {piece.noise_scale:g}")
    if piece.multiplier is not None:
        steps.append(f"multiplier {piece.multiplier:g}")
    steps.append(f"conversion to {job.dtype}")
    return non_finite_error(
        job.name,
        result,
        f"source tensor {source} after {', '.join(steps)}, whose values overflow",
        f"Use smaller noise_scale/residual_scale values, or an output dtype with a wider range (float32 or "
        f"bfloat16 instead of {job.dtype}).",
    )


def _non_finite_merge(
    name: str, rows: torch.Tensor, merge: TrunkMerge, start: int, stop: int, dtype: torch.dtype
) -> ModelError:
    sources = [merge.base, *merge.sources]
    damaged = [
        f"{location.name!r} of {location.file}"
        for location in sources
        if not bool(torch.isfinite(read_rows(location, start, stop)).all())
    ]
    if damaged:
        return non_finite_error(
            name,
            rows,
            f"merged by shared_weights ({merge.describe()}) from {', '.join(damaged)}, which holds NaN or Inf",
            "Use sources without such values, or shared_weights.method: base.",
        )
    return non_finite_error(
        name,
        rows,
        f"merged by shared_weights ({merge.describe()}) and its values overflow {str(dtype).removeprefix('torch.')}",
        "Use smaller shared_weights.weights or lambda (mergekit's usual lambda is around 1), or an output dtype "
        "with a wider range.",
    )


def check_written_shards(plan: MergePlan, folder: Path) -> None:
    """Re-read every shard header: the tensors, their shapes and sizes must be exactly the plan's."""
    for shard in range(plan.shard_count):
        path = folder / plan.shard_name(shard)
        written = read_header(path)
        expected = plan.shard_jobs(shard)
        if len(written) != len(expected) or any(
            job.name not in written or written[job.name].shape != job.shape or written[job.name].nbytes != job.nbytes
            for job in expected
        ):
            raise OutputError(
                f"Verification of {path} failed: its tensors do not match the plan. The output was discarded."
            )
        data_end = max((location.end for location in written.values()), default=0)
        if path.stat().st_size != data_end and expected:
            raise OutputError(f"Verification of {path} failed: the file size does not match its header.")


def _json_text(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def write_text_file(path: Path, text: str) -> FileRecord:
    """Write `text` as UTF-8; its record, hashed from the bytes written."""
    data = text.encode("utf-8")
    try:
        path.write_bytes(data)
    except OSError as error:
        raise OutputError(f"Writing {path} failed: {error.strerror or error}.") from None
    return FileRecord(path.name, len(data), hashlib.sha256(data).hexdigest())
