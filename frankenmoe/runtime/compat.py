"""What frankenmoe uses of torch, transformers and CPython that is not public API, each with why.

Every such name is used here and nowhere else in the package, so a new torch or transformers release
that moves one breaks this module (and its test in tests/test_compat.py, pinned to the installed
versions) instead of a merge. Each function says what it needs, why no public path does it, and what
the public path would be where one exists.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is slow to import: only a decoder with scaled rope imports it
    from transformers import PretrainedConfig

PICKLE_REBUILD_FUNCTIONS: dict[str, Callable[..., object]] = {
    f"torch._utils.{function.__name__}": function
    for function in (torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor_v3, torch._utils._rebuild_parameter)
}
"""The functions a torch.save pickle names to rebuild a tensor or a parameter from its storage, by the
global name the pickle gives them. They are private to torch, but they are the file format: torch's
own weights-only loader (torch.serialization) allows exactly these, and pickle_weights' reader calls
them on storages on the meta device, so that a tensor's dtype, shape, stride and offset are torch's own."""


def typed_storage(untyped: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """`untyped` seen as a storage of `dtype`: what a pickle's rebuild functions expect to be given.

    `_internal=True` is how torch's own unpickler builds one; without it torch warns that TypedStorage
    is deprecated on every storage of every file, although the pickle format still needs it.
    """
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def untyped_of(storage: torch.storage.TypedStorage) -> torch.UntypedStorage:
    """The untyped storage behind a typed one (the public `storage.untyped()` warns that TypedStorage
    is deprecated, as above)."""
    return storage._untyped_storage


def storage_identity(storage: torch.UntypedStorage) -> int:
    """A number that is the same for every view of one storage and differs between storages.

    torch.save identifies storages this way (`_cdata`, the address of the StorageImpl). The public
    `data_ptr()` cannot: every storage on the meta device, where the pickle reader builds its tensors,
    has data pointer 0.
    """
    return int(storage._cdata)


def rope_frequencies(config: PretrainedConfig, rope_type: str) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and its cos/sin scale for a scaled `rope_type` (llama3, yarn, linear...),
    computed by transformers' own functions from the config, on the CPU.

    transformers has no public function for them: its rotary-embedding modules call this table of
    functions, one module class per family. The table is the one place where every rope type's
    formula is, so the streamed decoder computes the same frequencies as transformers' layers.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inverse_frequencies, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inverse_frequencies, float(scaling)


def raise_in_thread(thread: threading.Thread, exception: type[BaseException]) -> None:
    """Make `thread` raise `exception` at its next Python instruction (CPython's PyThreadState_SetAsyncExc).

    Python has no public way to stop another thread; this C API is how a background router computation
    is cancelled between two torch calls without every gate mode polling a flag. Nothing happens when
    the thread has ended.
    """
    if thread.ident is None:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))
