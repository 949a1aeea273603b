"""A state dict's pickle (torch.save's data.pkl) read without running code from it.

Nothing in the pickle is trusted: its opcodes are decoded by pickletools (which executes none) and
interpreted here by a small reader that knows only what a state dict of plain tensors needs (protocols
2 to 5: strings, numbers, tuples, lists, dicts, the memo, and globals named by GLOBAL or STACK_GLOBAL).
Any global other than the few that such a state dict uses is refused when it is named, before anything
calls it; the only functions ever called are torch's tensor and parameter rebuild functions and
OrderedDict, with storages on the meta device: tensors get their dtype, shape, stride and offset, and no
tensor data is read. What the reader builds is bounded (PICKLE_BUILD_BUDGET): a hostile data.pkl that
would make millions of objects out of single-byte opcodes is refused instead.
"""

from __future__ import annotations

import pickletools
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TORCH_TO_SAFETENSORS, unsupported_dtype
from frankenmoe.runtime.compat import PICKLE_REBUILD_FUNCTIONS, storage_identity, typed_storage, untyped_of

_DTYPE_GLOBALS = frozenset(str(value) for value in vars(torch).values() if isinstance(value, torch.dtype))
_SUPPORTED_DTYPE_GLOBALS = frozenset(str(dtype) for dtype in TORCH_TO_SAFETENSORS)
# What a state dict of plain tensors (and parameters) asks its unpickler for: the tensor and parameter
# rebuild functions, the empty OrderedDict of backward hooks, typed storage markers and dtypes. None of
# them can run code, allocate memory or touch files, whatever arguments the pickle gives them.
_TENSOR_GLOBALS = _DTYPE_GLOBALS | {
    "collections.OrderedDict",
    *PICKLE_REBUILD_FUNCTIONS,
    *(
        f"torch.{kind}Storage"
        for kind in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
    ),
    *(f"torch.Complex{kind}Storage" for kind in ("Float", "Double")),
}
# torch.save marks the storages of dtypes without a typed storage class (FP8, uint16...) with this one. Torch's
# unpickler would also let the pickle call it and allocate any amount of memory, so it is not let through.
_UNTYPED_STORAGE = "torch.storage.UntypedStorage"
# What a malformed pickle makes the reader (or the rebuild functions it calls) raise.
MALFORMED_PICKLE_ERRORS = (
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
PICKLE_BUILD_BUDGET = 256 * 1024 * 1024
"""Bytes of memory that the objects the reader builds from one data.pkl may cost, as charged below. A state
dict costs about 3 KiB per tensor (about 40 opcodes and one meta tensor), so this admits some 80,000 tensors;
without it, 100 MiB of one-byte opcodes (MARK, EMPTY_LIST, MEMOIZE...) would build some 7 GB of objects."""
# What each opcode is charged: about what CPython spends on the object it builds or the slot it fills (an
# empty list and its stack slot, a memo entry, an int); a string or a number is charged its size on top.
_OPCODE_CHARGE = 72
_TENSOR_CHARGE = 1024
_REPR = reprlib.Repr()
# Values from a hostile pickle can be deeply nested or huge: messages show a bounded prefix of them.
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 6, 40, 40
_bounded_repr = _REPR.repr


@dataclass(frozen=True)
class Storage:
    """One storage the pickle refers to: its zip member key and its size."""

    key: str
    nbytes: int


def _check_globals(path: Path, names: dict[str, None]) -> None:
    """Refuse the untyped storage marker: torch.save names it only for dtypes frankenmoe cannot read."""
    if _UNTYPED_STORAGE in names:
        odd_dtypes = [
            name.removeprefix("torch.") for name in names if name in _DTYPE_GLOBALS - _SUPPORTED_DTYPE_GLOBALS
        ]
        if not odd_dtypes:
            raise _refused(path, _UNTYPED_STORAGE)
        raise unsupported_dtype(path, ", ".join(odd_dtypes))


def _allowed_global(name: str) -> object:
    """The object a permitted global stands for (torch's own loader maps storage classes to StorageType)."""
    if name == "collections.OrderedDict":
        return OrderedDict
    if name in PICKLE_REBUILD_FUNCTIONS:
        return PICKLE_REBUILD_FUNCTIONS[name]
    if name.endswith("Storage"):
        return torch.serialization.StorageType(name.removeprefix("torch."))
    return getattr(torch, name.removeprefix("torch."))


# The only functions a pickle may call: each builds one tensor, parameter or empty OrderedDict.
_CALLABLES = (OrderedDict, *PICKLE_REBUILD_FUNCTIONS.values())
_LITERAL_OPCODES = frozenset(
    {
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINSTRING",
        "BINSTRING",
    }
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_EMPTY = {"EMPTY_TUPLE": tuple, "EMPTY_LIST": list, "EMPTY_DICT": dict}
_ENDS = frozenset({"PROTO", "FRAME"})


class StateDictReader:
    """Interprets the opcodes of a state dict's pickle with a fixed set of globals and a memory budget."""

    def __init__(self, path: Path, persistent_load: Callable[[object], object]) -> None:
        self.path = path
        self.persistent_load = persistent_load
        self.names: dict[str, None] = {}
        """Every global named, in order of first use."""
        self.charged = 0
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []
        self.memo: dict[int, object] = {}

    def load(self, pickle_bytes: bytes) -> object:
        """The object `pickle_bytes` describes, built with the allowed globals only.

        One branch per accepted opcode, kept in one function although it is longer than the ~60 lines a
        function should be: everything a hostile data.pkl can make the reader do is this one list, which a
        review reads top to bottom, and any opcode not named in it is refused by the final `else`.
        """
        for opcode, argument, _ in pickletools.genops(pickle_bytes):
            name = opcode.name
            self._charge(_OPCODE_CHARGE + _size(argument))
            if name == "STOP":
                return self.stack.pop()
            if name in _ENDS:
                continue
            if name in _LITERAL_OPCODES:
                self.stack.append(argument)
            elif name in _CONSTANTS:
                self.stack.append(_CONSTANTS[name])
            elif name in _EMPTY:
                self.stack.append(_EMPTY[name]())
            elif name == "MARK":
                self.metastack.append(self.stack)
                self.stack = []
            elif name == "TUPLE":
                items = self._pop_mark()
                self.stack.append(tuple(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = self.stack[-count:]
                if len(items) != count:
                    raise IndexError(f"{name} needs {count} items on the stack")
                del self.stack[-count:]
                self.stack.append(tuple(items))
            elif name == "APPEND":
                item = self.stack.pop()
                self._target(list).append(item)
            elif name == "APPENDS":
                items = self._pop_mark()
                self._target(list).extend(items)
            elif name == "SETITEM":
                value = self.stack.pop()
                key = self.stack.pop()
                self._target(dict)[self._key(key)] = value
            elif name == "SETITEMS":
                items = self._pop_mark()
                target = self._target(dict)
                if len(items) % 2:
                    raise ValueError("SETITEMS has a key without a value")
                for index in range(0, len(items) - 1, 2):
                    target[self._key(items[index])] = items[index + 1]
            elif name in ("BINGET", "LONG_BINGET"):
                self.stack.append(self.memo[argument])
            elif name in ("BINPUT", "LONG_BINPUT"):
                self.memo[argument] = self.stack[-1]
            elif name == "MEMOIZE":
                self.memo[len(self.memo)] = self.stack[-1]
            elif name == "GLOBAL":
                self.stack.append(self._global(*str(argument).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                attribute = self.stack.pop()
                module = self.stack.pop()
                if not isinstance(module, str) or not isinstance(attribute, str):
                    raise TypeError("STACK_GLOBAL needs two strings on the stack")
                self.stack.append(self._global(module, attribute))
            elif name == "REDUCE":
                self._reduce()
            elif name == "BUILD":
                # model.state_dict() is an OrderedDict carrying `_metadata` (module versions), which
                # torch.save stores as the dict's state: nothing a merge reads, so it is left out.
                state = self.stack.pop()
                if type(self.stack[-1]) is not OrderedDict or type(state) is not dict:
                    raise TypeError(f"the pickle sets the state of a {type(self.stack[-1]).__name__}")
            elif name == "BINPERSID":
                self.stack.append(self.persistent_load(self.stack.pop()))
            else:
                raise corrupt_file(
                    self.path, f"its data.pkl uses the {name} opcode, which a state dict of tensors never needs"
                )
        raise EOFError("the pickle ends without a STOP opcode")

    def _charge(self, nbytes: int) -> None:
        self.charged += nbytes
        if self.charged > PICKLE_BUILD_BUDGET:
            raise ModelError(
                f"{self.path} has a data.pkl that would build more than {PICKLE_BUILD_BUDGET // 2**20} MiB of "
                "objects before its state dict is complete, far more than the description of a state dict of "
                "tensors needs (about 3 KiB per tensor). frankenmoe stopped reading it: the file is damaged or "
                "crafted to exhaust memory. Use the model's safetensors weights, or re-save the state dict with "
                "torch.save in an environment you trust."
            )

    def _pop_mark(self) -> list[object]:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _target(self, kind: type) -> object:
        # Exactly the built-in containers: a subclass could run code when filled.
        target = self.stack[-1]
        if type(target) not in (kind, OrderedDict if kind is dict else kind):
            raise TypeError(f"cannot add items to a {type(target).__name__}")
        return target

    @staticmethod
    def _key(key: object) -> str | int:
        # A state dict's keys are names; anything else could be slow or deeply recursive to hash.
        if type(key) not in (str, int):
            raise TypeError(f"a dictionary key is a {type(key).__name__}, not a name")
        return key  # type: ignore[return-value]

    def _global(self, module: str, attribute: str) -> object:
        name = f"{module}.{attribute}"
        self.names[name] = None
        if name == _UNTYPED_STORAGE:
            # Judged once every global is known (see _check_globals): it stands for a dtype's storage.
            return torch.UntypedStorage
        if name not in _TENSOR_GLOBALS:
            raise _refused(self.path, name)
        return _allowed_global(name)

    def _reduce(self) -> None:
        arguments = self.stack.pop()
        function = self.stack[-1]
        if not any(function is allowed for allowed in _CALLABLES) or type(arguments) is not tuple:
            raise TypeError(f"the pickle calls {_bounded_repr(function)}, which is not a rebuild function")
        if function is OrderedDict and arguments:
            raise TypeError("the pickle fills an OrderedDict through its constructor")
        if function is not OrderedDict:
            self._charge(_TENSOR_CHARGE)
        self.stack[-1] = function(*arguments)


def _size(argument: object) -> int:
    """Bytes a decoded opcode argument holds beyond a small object (long strings and big integers)."""
    if isinstance(argument, str):
        return len(argument)
    if type(argument) is int:
        return argument.bit_length() // 8
    return 0


def unpickle_on_meta(path: Path, pickle_bytes: bytes) -> dict[str, tuple[torch.Tensor, Storage]]:
    """Each tensor of the state dict on the meta device, with the storage it views."""
    storages: dict[str, Storage] = {}
    meta_storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: object) -> torch.storage.TypedStorage:
        key, dtype, nbytes = _storage_reference(path, saved_id)
        if key not in meta_storages:
            storages[key] = Storage(key, nbytes)
            untyped = torch.UntypedStorage(nbytes, device="meta")
            meta_storages[key] = typed_storage(untyped, dtype)
        elif storages[key].nbytes != nbytes or meta_storages[key].dtype != dtype:
            raise corrupt_file(path, f"storage {key!r} is described twice, with different dtypes or sizes")
        return meta_storages[key]

    reader = StateDictReader(path, persistent_load)
    try:
        state = reader.load(pickle_bytes)
    except MALFORMED_PICKLE_ERRORS as error:
        # A refused global explains a failure better than the failure itself.
        _check_globals(path, reader.names)
        raise corrupt_file(path, f"its data.pkl cannot be read as a state dict ({error})") from None
    _check_globals(path, reader.names)
    if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
        raise _not_a_state_dict(path, f"it holds a {type(state).__name__}")
    # A storage is identified by its StorageImpl, as torch.save itself does.
    by_impl = {storage_identity(untyped_of(meta_storages[key])): storage for key, storage in storages.items()}
    tensors: dict[str, tuple[torch.Tensor, Storage]] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise _not_a_state_dict(path, f"its entry {name!r} is a {type(tensor).__name__}, not a tensor")
        storage = by_impl.get(storage_identity(tensor.untyped_storage()))
        if storage is None:
            raise corrupt_file(path, f"tensor {name!r} has no data in the file")
        tensors[name] = (tensor, storage)
    return tensors


def _storage_reference(path: Path, saved_id: object) -> tuple[str, torch.dtype, int]:
    """Key, dtype and byte size of a storage from its persistent id ('storage', type, key, location, numel)."""
    if not isinstance(saved_id, tuple) or len(saved_id) != 5:
        raise corrupt_file(path, f"a storage reference has an unexpected form ({_bounded_repr(saved_id)})")
    _, storage_type, key, _, numel = saved_id
    # torch.load's rule: untyped storages count bytes, typed ones count elements of their dtype.
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise corrupt_file(path, f"a storage reference has an unexpected form ({_bounded_repr(saved_id)})")
    return key, dtype, numel * dtype.itemsize


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


def corrupt_file(path: Path, detail: str) -> ModelError:
    return ModelError(
        f"{path} is not a valid torch weights file: {detail}. The file is probably truncated or damaged; "
        "download or convert it again."
    )
