"""Pickle-format weights (torch.save's zip format) indexed as byte ranges, without running code from the file.

A `pytorch_model.bin` written by torch 1.6 or later is a zip archive: `<prefix>/data.pkl` is a small
pickle describing the state dict, and each tensor storage is a separate, uncompressed member
`<prefix>/data/<key>`. The pickle is read twice, and nothing in it is trusted:

1. Its opcodes are scanned without executing any (pickletools), and the file is refused unless every
   global it names is one of the few that a state dict of plain tensors needs.
2. Torch's restricted weights-only unpickler then builds the state dict, with storages on the meta
   device: tensors get their dtype, shape, stride and offset, and no tensor data is read.

Each tensor then becomes a byte range inside the .bin file (the storage member's data offset plus
the tensor's offset in its storage), the same TensorLocation a safetensors header produces. So the
rest of a merge reads and copies these tensors exactly as it does safetensors ones, and memory
stays bounded: only data.pkl is ever read whole.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import _weights_only_unpickler

from frankenmoe.errors import ModelError
from frankenmoe.tensor_io import TORCH_TO_SAFETENSORS, TensorLocation, unsupported_dtype

# torch.load(weights_only=True) below 2.6 could be made to run code (CVE-2025-32434).
SAFE_TORCH_VERSION = "2.6"
MAX_PICKLE_BYTES = 100 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")

_DTYPE_GLOBALS = frozenset(str(value) for value in vars(torch).values() if isinstance(value, torch.dtype))
_SUPPORTED_DTYPE_GLOBALS = frozenset(str(dtype) for dtype in TORCH_TO_SAFETENSORS)
# What a state dict of plain tensors (and parameters) asks its unpickler for: the tensor and parameter
# rebuild functions, the empty OrderedDict of backward hooks, typed storage markers and dtypes. None of
# them can run code, allocate memory or touch files, whatever arguments the pickle gives them.
_TENSOR_GLOBALS = _DTYPE_GLOBALS | {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    *(
        f"torch.{kind}Storage"
        for kind in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
    ),
    *(f"torch.Complex{kind}Storage" for kind in ("Float", "Double")),
}
# torch.save marks the storages of dtypes without a typed storage class (FP8, uint16...) with this one. Torch's
# unpickler would also let the pickle call it and allocate any amount of memory, so it is not let through.
_UNTYPED_STORAGE = "torch.storage.UntypedStorage"
# Opcodes that reach globals other than through GLOBAL/INST's visible "module name" argument.
_OPAQUE_GLOBAL_OPCODES = frozenset({"STACK_GLOBAL", "EXT1", "EXT2", "EXT4"})
# What a malformed pickle makes torch's unpickler (or the rebuild functions it calls) raise.
_MALFORMED_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    RuntimeError,
    struct.error,
    OverflowError,
)


@dataclass(frozen=True)
class _Storage:
    """One storage the pickle refers to: its zip member key and its size."""

    key: str
    nbytes: int


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
            _check_globals(path, pickle_bytes)
            tensors = _unpickle_on_meta(path, pickle_bytes)
            storages = {storage for _, storage in tensors.values()}
            data_starts = {storage.key: _data_start(path, archive, prefix, handle, storage) for storage in storages}
    except zipfile.BadZipFile as error:
        raise _corrupt(path, f"its zip structure is damaged ({error})") from None
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
        raise _corrupt(path, "it is a zip archive but not one written by torch.save (it has no data.pkl)")
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
        raise _corrupt(path, f"its {name} claims {info.file_size} bytes (the limit is {MAX_PICKLE_BYTES})")
    return archive.read(info)


def _check_globals(path: Path, pickle_bytes: bytes) -> None:
    """Refuse, before anything is unpickled, a pickle that names anything but tensor-building globals."""
    names = _globals_named(path, pickle_bytes)
    refused = [name for name in names if name not in _TENSOR_GLOBALS and name != _UNTYPED_STORAGE]
    if refused:
        raise _refused(path, refused[0])
    if _UNTYPED_STORAGE in names:
        odd_dtypes = [
            name.removeprefix("torch.") for name in names if name in _DTYPE_GLOBALS - _SUPPORTED_DTYPE_GLOBALS
        ]
        if not odd_dtypes:
            raise _refused(path, _UNTYPED_STORAGE)
        raise unsupported_dtype(path, ", ".join(odd_dtypes))


def _globals_named(path: Path, pickle_bytes: bytes) -> list[str]:
    """Every global the pickle names, in order of first use, read from its opcodes without executing any."""
    names: dict[str, None] = {}
    try:
        for opcode, argument, _ in pickletools.genops(pickle_bytes):
            if opcode.name in _OPAQUE_GLOBAL_OPCODES:
                raise _refused(path, f"a global looked up through the {opcode.name} opcode")
            if opcode.name in ("GLOBAL", "INST"):
                names[".".join(str(argument).split(" ", 1))] = None
    except ValueError as error:
        raise _corrupt(path, f"its data.pkl is not a valid pickle ({error})") from None
    return list(names)


def _unpickle_on_meta(path: Path, pickle_bytes: bytes) -> dict[str, tuple[torch.Tensor, _Storage]]:
    """Each tensor of the state dict on the meta device, with the storage it views."""
    storages: dict[str, _Storage] = {}
    meta_storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: object) -> torch.storage.TypedStorage:
        key, dtype, nbytes = _storage_reference(path, saved_id)
        if key not in meta_storages:
            storages[key] = _Storage(key, nbytes)
            untyped = torch.UntypedStorage(nbytes, device="meta")
            meta_storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        elif storages[key].nbytes != nbytes or meta_storages[key].dtype != dtype:
            raise _corrupt(path, f"storage {key!r} is described twice, with different dtypes or sizes")
        return meta_storages[key]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickle_bytes), encoding="utf-8")
    # The same hook torch.load installs; only the storages it returns differ (meta, so nothing is read).
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    try:
        state = unpickler.load()
    except _MALFORMED_PICKLE_ERRORS as error:
        raise _corrupt(path, f"its data.pkl cannot be unpickled as a state dict ({error})") from None
    if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
        raise _not_a_state_dict(path, f"it holds a {type(state).__name__}")
    # A storage is identified by its StorageImpl, as torch.save itself does.
    by_impl = {meta_storages[key]._untyped_storage._cdata: storage for key, storage in storages.items()}
    tensors: dict[str, tuple[torch.Tensor, _Storage]] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise _not_a_state_dict(path, f"its entry {name!r} is a {type(tensor).__name__}, not a tensor")
        storage = by_impl.get(tensor.untyped_storage()._cdata)
        if storage is None:
            raise _corrupt(path, f"tensor {name!r} has no data in the file")
        tensors[name] = (tensor, storage)
    return tensors


def _storage_reference(path: Path, saved_id: object) -> tuple[str, torch.dtype, int]:
    """Key, dtype and byte size of a storage from its persistent id ('storage', type, key, location, numel)."""
    if not isinstance(saved_id, tuple) or len(saved_id) != 5:
        raise _corrupt(path, f"a storage reference has an unexpected form ({saved_id!r})")
    _, storage_type, key, _, numel = saved_id
    # torch.load's rule: untyped storages count bytes, typed ones count elements of their dtype.
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _corrupt(path, f"a storage reference has an unexpected form ({saved_id!r})")
    return key, dtype, numel * dtype.itemsize


def _data_start(path: Path, archive: zipfile.ZipFile, prefix: str, handle: BinaryIO, storage: _Storage) -> int:
    """Where a storage member's bytes begin in the file: after its local header, whose length the zip index lacks."""
    try:
        info = archive.getinfo(f"{prefix}/data/{storage.key}")
    except KeyError:
        raise _corrupt(path, f"it has no data for storage {storage.key!r}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise ModelError(
            f"{path} stores storage {storage.key!r} compressed or encrypted; torch.save never does, and frankenmoe "
            "reads tensors as uncompressed byte ranges. Re-save the state dict with torch.save, or convert the "
            "model to safetensors."
        )
    if info.file_size != storage.nbytes:
        raise _corrupt(
            path, f"storage {storage.key!r} holds {info.file_size} bytes but its tensors need {storage.nbytes}"
        )
    header = os.pread(handle.fileno(), _LOCAL_HEADER.size, info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise _corrupt(path, f"the zip header of storage {storage.key!r} is cut short")
    signature, _, _, compression, *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != ZIP_MAGIC or compression != zipfile.ZIP_STORED:
        raise _corrupt(path, f"the zip header of storage {storage.key!r} is damaged")
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + storage.nbytes > os.fstat(handle.fileno()).st_size:
        raise _corrupt(path, f"storage {storage.key!r} ends past the end of the file")
    return start


def _location(path: Path, name: str, tensor: torch.Tensor, storage: _Storage, data_start: int) -> TensorLocation:
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
        raise _corrupt(path, f"tensor {name!r} extends past the end of its storage")
    start = data_start + begin
    return TensorLocation(name, path, dtype, tuple(tensor.shape), start, start + nbytes, file_format="pickle")


def _legacy(path: Path) -> ModelError:
    return ModelError(
        f"{path} is not in torch's zip format: it is a bare pickle, or a file torch.save wrote before torch 1.6. "
        "frankenmoe never unpickles such files: they cannot be read with the weights-only loader without loading "
        "the whole model into memory. Re-save the state dict with torch 1.6 or later in an environment you trust, "
        "or convert the model to safetensors."
    )


def _not_a_state_dict(path: Path, detail: str) -> ModelError:
    return ModelError(
        f"{path} is not a state dict of tensors: {detail}. frankenmoe reads files that map tensor names to "
        "tensors and nothing else (a training checkpoint nests the weights under a key such as 'state_dict'). "
        "Save just the model's state dict (torch.save(model.state_dict(), path)), or convert it to safetensors."
    )


def _refused(path: Path, what: str) -> ModelError:
    return ModelError(
        f"{path} asks its unpickler for {what}, which is not a tensor or a plain container. frankenmoe refused the "
        "file without running any of it: weights need nothing else, and a file like this may be an attempt to run "
        "code on your machine. Use the model's safetensors weights, or convert it in an isolated environment."
    )


def _corrupt(path: Path, detail: str) -> ModelError:
    return ModelError(
        f"{path} is not a valid torch weights file: {detail}. The file is probably truncated or damaged; "
        "download or convert it again."
    )
