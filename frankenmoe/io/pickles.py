"""Pickle-format weights (torch.save's zip format) indexed as byte ranges, without running code from the file.

A `pytorch_model.bin` written by torch 1.6 or later is a zip archive: `<prefix>/data.pkl` is a small
pickle describing the state dict, and each tensor storage is a separate, uncompressed member
`<prefix>/data/<key>`. The pickle is read by frankenmoe.io.pickle_reader, which runs nothing from it
and builds each tensor on the meta device.

Each tensor then becomes a byte range inside the .bin file (the storage member's data offset plus
the tensor's offset in its storage), the same TensorLocation a safetensors header produces. So the
rest of a merge reads and copies these tensors exactly as it does safetensors ones, and memory
stays bounded: only data.pkl is ever read whole.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import torch

from frankenmoe.errors import ModelError
from frankenmoe.io.pickle_reader import Storage, corrupt_file, unpickle_on_meta
from frankenmoe.io.safetensors import TORCH_TO_SAFETENSORS, TensorLocation, unsupported_dtype

# torch.load(weights_only=True) below 2.6 could be made to run code (CVE-2025-32434); the rebuild functions
# this reader calls are the ones that loader calls, so the same versions are refused.
SAFE_TORCH_VERSION = "2.6"
MAX_PICKLE_BYTES = 100 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def _is_zip(path: Path) -> bool:
    """Whether `path` starts like torch's zip format (as opposed to a bare or legacy pickle)."""
    with path.open("rb") as handle:
        return handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def read_pickle_index(path: Path) -> dict[str, TensorLocation]:
    """Every tensor of a torch zip-format state dict, as byte ranges inside `path`; no tensor data is read."""
    require_safe_torch()
    try:
        if not _is_zip(path):
            raise _legacy(path)
        with zipfile.ZipFile(path) as archive, path.open("rb", buffering=0) as handle:
            prefix = _archive_prefix(path, archive)
            _check_byteorder(path, archive, prefix)
            pickle_bytes = _read_small_member(path, archive, f"{prefix}/data.pkl")
            tensors = unpickle_on_meta(path, pickle_bytes)
            storages = {storage for _, storage in tensors.values()}
            data_starts = {storage.key: _data_start(path, archive, prefix, handle, storage) for storage in storages}
    except zipfile.BadZipFile as error:
        raise corrupt_file(path, f"its zip structure is damaged ({error})") from None
    except OSError as error:
        raise ModelError(f"Cannot read {path}: {error.strerror or error}. Check that the file is readable.") from None
    return {
        name: _location(path, name, tensor, storage, data_starts[storage.key])
        for name, (tensor, storage) in tensors.items()
    }


def require_safe_torch() -> None:
    """Refuse to unpickle anything with a torch whose weights-only loader is known to run code."""
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < SAFE_TORCH_VERSION:
        raise ModelError(
            f"Reading pickle-format weights needs torch {SAFE_TORCH_VERSION} or later, but torch {version} is "
            "installed: its weights-only unpickler has known flaws that let a crafted file run code "
            f"(CVE-2025-32434). Upgrade torch (pip install 'torch>={SAFE_TORCH_VERSION}'), or use the model's "
            "safetensors weights."
        )


def _archive_prefix(path: Path, archive: zipfile.ZipFile) -> str:
    """The folder every member lives in (torch names it after the file); data.pkl must be in it."""
    names = archive.namelist()
    prefix = names[0].split("/", 1)[0] if names else ""
    if f"{prefix}/data.pkl" not in names:
        raise corrupt_file(path, "it is a zip archive but not one written by torch.save (it has no data.pkl)")
    return prefix


def _check_byteorder(path: Path, archive: zipfile.ZipFile, prefix: str) -> None:
    # Files from before torch recorded a byte order were written little-endian in practice.
    name = f"{prefix}/byteorder"
    if name not in archive.namelist():
        return
    byteorder = _read_small_member(path, archive, name).decode("ascii", "replace").strip()
    if byteorder != "little":
        raise ModelError(
            f"{path} stores its tensors {byteorder}-endian; frankenmoe reads only little-endian weights, whose "
            "bytes it copies unchanged into the output. Convert the model to safetensors on a machine of that "
            "byte order first."
        )


def _read_small_member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_PICKLE_BYTES:
        raise corrupt_file(path, f"its {name} claims {info.file_size} bytes (the limit is {MAX_PICKLE_BYTES})")
    if info.flag_bits & 0x1:
        # zipfile would ask for a password (RuntimeError); torch.save never encrypts.
        raise corrupt_file(path, f"its {name} is flagged as encrypted, which torch.save never does")
    try:
        return archive.read(info)
    except NotImplementedError as error:
        raise corrupt_file(path, f"its {name} uses a compression method that cannot be read ({error})") from None
    except (zlib.error, EOFError, RuntimeError, ValueError) as error:
        raise corrupt_file(path, f"its {name} cannot be decompressed ({error})") from None


def _data_start(path: Path, archive: zipfile.ZipFile, prefix: str, handle: BinaryIO, storage: Storage) -> int:
    """Where a storage member's bytes begin in the file: after its local header, whose length the zip index lacks."""
    try:
        info = archive.getinfo(f"{prefix}/data/{storage.key}")
    except KeyError:
        raise corrupt_file(path, f"it has no data for storage {storage.key!r}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise ModelError(
            f"{path} stores storage {storage.key!r} compressed or encrypted; torch.save never does, and frankenmoe "
            "reads tensors as uncompressed byte ranges. Re-save the state dict with torch.save, or convert the "
            "model to safetensors."
        )
    if info.file_size != storage.nbytes:
        raise corrupt_file(
            path, f"storage {storage.key!r} holds {info.file_size} bytes but its tensors need {storage.nbytes}"
        )
    header = os.pread(handle.fileno(), _LOCAL_HEADER.size, info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise corrupt_file(path, f"the zip header of storage {storage.key!r} is cut short")
    signature, _, _, compression, *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != ZIP_MAGIC or compression != zipfile.ZIP_STORED:
        raise corrupt_file(path, f"the zip header of storage {storage.key!r} is damaged")
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + storage.nbytes > os.fstat(handle.fileno()).st_size:
        raise corrupt_file(path, f"storage {storage.key!r} ends past the end of the file")
    return start


def _location(path: Path, name: str, tensor: torch.Tensor, storage: Storage, data_start: int) -> TensorLocation:
    """The byte range of one contiguous tensor: where its storage's data begins, plus its offset in it."""
    dtype = TORCH_TO_SAFETENSORS.get(tensor.dtype)
    if dtype is None:
        raise unsupported_dtype(path, str(tensor.dtype).removeprefix("torch."), name)
    if not tensor.is_contiguous():
        raise ModelError(
            f"{path}: tensor {name!r} is stored as a strided view of its storage (shape {list(tensor.shape)}, "
            f"stride {list(tensor.stride())}), so its bytes are not one range and frankenmoe cannot stream it. "
            "Save the state dict with contiguous tensors ({name: t.contiguous() for name, t in state.items()}), "
            "or convert the model to safetensors."
        )
    begin = tensor.storage_offset() * tensor.element_size()
    nbytes = tensor.numel() * tensor.element_size()
    if begin + nbytes > storage.nbytes:
        raise corrupt_file(path, f"tensor {name!r} extends past the end of its storage")
    start = data_start + begin
    return TensorLocation(name, path, dtype, tuple(tensor.shape), start, start + nbytes, file_format="pickle")


def _legacy(path: Path) -> ModelError:
    return ModelError(
        f"{path} is not in torch's zip format: it is a bare pickle, or a file torch.save wrote before torch 1.6. "
        "frankenmoe never unpickles such files: they cannot be read with the weights-only loader without loading "
        "the whole model into memory. Re-save the state dict with torch 1.6 or later in an environment you trust, "
        "or convert the model to safetensors."
    )
