"""frankenmoe.runtime.compat, the non-public names of torch, transformers and CPython that frankenmoe uses, each
checked against the installed versions: it still exists, and it gives what the public path gives where
there is one. A release that moves one of them fails here, naming it, before a merge fails."""

from __future__ import annotations

import io
import pickletools
import threading
import time
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from frankenmoe.runtime.compat import (
    PICKLE_REBUILD_FUNCTIONS,
    raise_in_thread,
    rope_frequencies,
    storage_identity,
    typed_storage,
    untyped_of,
)
from tests.support import LLAMA3_ROPE


def saved_globals(value: object) -> set[str]:
    """The globals torch.save's pickle of `value` names (module.attribute)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    with zipfile.ZipFile(buffer) as archive:
        pickle_bytes = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    names, strings = set(), []
    for opcode, argument, _ in pickletools.genops(pickle_bytes):
        if opcode.name == "GLOBAL":
            names.add(str(argument).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        if isinstance(argument, str):
            strings.append(argument)
    return names


def test_the_rebuild_functions_are_the_ones_torch_save_names() -> None:
    state = {"tensor": torch.arange(6.0), "parameter": torch.nn.Parameter(torch.ones(2, 3))}
    rebuilders = {name for name in saved_globals(state) if name.startswith("torch._utils.")}
    assert rebuilders == {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    assert rebuilders < set(PICKLE_REBUILD_FUNCTIONS)
    assert "torch._utils._rebuild_tensor_v3" in PICKLE_REBUILD_FUNCTIONS


def test_rebuilding_on_meta_storage_gives_the_tensor_torch_load_gives() -> None:
    original = torch.arange(24.0, dtype=torch.bfloat16).reshape(4, 6)[1:, ::2]
    buffer = io.BytesIO()
    torch.save(original, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    storage = typed_storage(torch.UntypedStorage(24 * 2, device="meta"), torch.bfloat16)
    rebuild = PICKLE_REBUILD_FUNCTIONS["torch._utils._rebuild_tensor_v2"]
    rebuilt = rebuild(storage, original.storage_offset(), original.shape, original.stride(), False, OrderedDict())
    assert (rebuilt.device.type, rebuilt.dtype) == ("meta", torch.bfloat16)
    assert (rebuilt.shape, rebuilt.stride(), rebuilt.storage_offset()) == (
        loaded.shape,
        loaded.stride(),
        loaded.storage_offset(),
    )
    parameter = PICKLE_REBUILD_FUNCTIONS["torch._utils._rebuild_parameter"](rebuilt, False, OrderedDict())
    assert isinstance(parameter, torch.nn.Parameter)
    assert parameter.shape == loaded.shape


def test_a_typed_storage_is_made_without_the_deprecation_warning() -> None:
    untyped = torch.UntypedStorage(16, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        typed = typed_storage(untyped, torch.float32)
        assert untyped_of(typed) is untyped
        assert typed.dtype == torch.float32
    # The public ways give the same storage, but warn (once per process) that TypedStorage is deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert typed.untyped() is untyped
        assert typed.size() == 4


def test_storage_identity_tells_storages_apart_where_data_pointers_cannot() -> None:
    first, second = torch.empty(8, device="meta"), torch.empty(8, device="meta")
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr() == 0
    assert storage_identity(first.untyped_storage()) != storage_identity(second.untyped_storage())
    assert storage_identity(first[2:].untyped_storage()) == storage_identity(first.untyped_storage())
    on_cpu = torch.arange(8.0)
    assert storage_identity(on_cpu[3:].untyped_storage()) == storage_identity(on_cpu.view(2, 4).untyped_storage())


@pytest.mark.parametrize(
    "rope_parameters",
    [
        LLAMA3_ROPE,
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0},
    ],
    ids=lambda parameters: parameters["rope_type"],
)
def test_rope_frequencies_are_those_of_transformers_rotary_embedding(rope_parameters: dict[str, object]) -> None:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters=rope_parameters,
    )
    inverse_frequencies, scaling = rope_frequencies(config, str(rope_parameters["rope_type"]))
    module = LlamaRotaryEmbedding(config)
    assert torch.equal(inverse_frequencies, module.inv_freq)
    assert scaling == pytest.approx(module.attention_scaling)
    assert inverse_frequencies.shape == (8,)


class Stopped(BaseException):
    pass


def test_raise_in_thread_stops_a_running_thread_at_its_next_instruction() -> None:
    outcome: list[str] = []
    started = threading.Event()

    def work() -> None:
        started.set()
        try:
            while True:
                time.sleep(0.001)
        except Stopped:
            outcome.append("stopped")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    started.wait()
    raise_in_thread(thread, Stopped)
    thread.join(5)
    assert not thread.is_alive()
    assert outcome == ["stopped"]
    raise_in_thread(thread, Stopped)  # an ended thread: nothing happens


def test_raise_in_thread_does_nothing_to_a_thread_never_started() -> None:
    raise_in_thread(threading.Thread(target=lambda: None), Stopped)
