"""Text generation (router.continuation_tokens) multiplies bfloat16 matrices as stored where the CPU can.

On a CPU with bfloat16 matrix units, torch multiplies bfloat16 matrices directly with float32
accumulation, so generation need not convert every slice of the base to float32 once per token
(issue 28). These tests pin down what that mode computes, that it is deterministic, that it is used
only for generation (the states the routers are fitted on stay float32), and that the manifest says
which products a merge used.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.config.parse import load_config
from frankenmoe.config.schema import RouterConfig
from frankenmoe.decoder import slices
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.generate import greedy_continuations
from frankenmoe.decoder.slices import MatrixRows, SliceCache, slice_product
from frankenmoe.io.safetensors import read_tensor
from frankenmoe.routers import GateRequest, compute_gates
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import run_cli, write_config

SHAPE = ToyShape(64, 2, 128, 4, 2, 32000, 512)


@pytest.fixture(scope="module")
def bfloat16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_model(tmp_path_factory.mktemp("bf16") / "base", shape=SHAPE, dtype="bfloat16", base_seed=3)


@pytest.fixture
def many_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slices, "SLICE_BYTES", 7 * 64 * 4)  # 7-row slices of the toy model's 64-wide matrices


def gate_proj(model: Path) -> MatrixRows:
    source = load_source(str(model))
    return MatrixRows.whole(source.tensor(source.family.mlp_name(1, "gate_proj")))


def test_native_products_multiply_the_stored_bfloat16_rows_by_bfloat16_tokens(
    bfloat16_model: Path, many_slices: None
) -> None:
    matrix = gate_proj(bfloat16_model)
    weight = read_tensor(matrix.location)
    assert weight.dtype == torch.bfloat16
    tokens = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    native_cache = SliceCache(native_bfloat16=True)
    starts = slices.slice_starts(matrix, cpu, native_cache)
    assert starts.step == 2 * matrix.slice_starts.step  # as many bytes as a float32 slice
    for start in starts:
        rows = weight[start : start + starts.step]
        native = slice_product(tokens, matrix, start, cpu, native_cache)
        assert native.dtype == torch.float32
        assert torch.equal(native, (tokens.to(torch.bfloat16) @ rows.T).float())
        exact = torch.cat(
            [
                slice_product(tokens, matrix, s, cpu, None)
                for s in range(start, start + len(rows), matrix.slice_starts.step)
            ],
            dim=-1,
        )
        torch.testing.assert_close(exact, tokens @ rows.float().T, rtol=1e-6, atol=1e-6)  # float32 slices
        torch.testing.assert_close(native, exact, rtol=2e-2, atol=2e-2)


def test_float32_stored_matrices_are_never_multiplied_in_bfloat16(tmp_path: Path) -> None:
    model = write_toy_model(tmp_path / "f32", shape=SHAPE, dtype="float32")
    matrix = gate_proj(model)
    cache = SliceCache(native_bfloat16=True)
    assert not cache.multiplies_natively(matrix, torch.device("cpu"))
    tokens = torch.randn(3, 64)
    assert torch.equal(
        slice_product(tokens, matrix, 0, torch.device("cpu"), cache),
        slice_product(tokens, matrix, 0, torch.device("cpu"), None),
    )


def test_kept_bfloat16_slices_cost_two_bytes_each_and_change_no_result(bfloat16_model: Path, many_slices: None) -> None:
    matrix = gate_proj(bfloat16_model)
    tokens = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    cpu = torch.device("cpu")
    keeping = SliceCache(budget=1 << 20, native_bfloat16=True)
    streaming = SliceCache(native_bfloat16=True)
    for start in slices.slice_starts(matrix, cpu, streaming):
        assert torch.equal(
            slice_product(tokens, matrix, start, cpu, keeping), slice_product(tokens, matrix, start, cpu, streaming)
        )
    assert keeping.used == matrix.num_rows * 64 * 2
    assert streaming.used == 0


def test_bfloat16_continuations_are_the_same_from_run_to_run_and_for_any_number_of_workers(
    bfloat16_model: Path, monkeypatch: pytest.MonkeyPatch, many_slices: None
) -> None:
    source = load_source(str(bfloat16_model))
    tokenizer = load_tokenizer(bfloat16_model)
    prompts = [torch.tensor(tokenizer(text)["input_ids"]) for text in ("red blue", "the river ran", "seven")]
    runs = []
    for workers in (1, 2, 2):
        monkeypatch.setenv("OMP_NUM_THREADS", str(workers))
        writer = StreamedDecoder(source.config, source.tensors, slice_cache=SliceCache(native_bfloat16=True))
        runs.append([tokens.tolist() for tokens in greedy_continuations(writer, prompts, 6, frozenset())])
    assert runs[0] == runs[1] == runs[2]
    assert all(len(tokens) == 6 for tokens in runs[0])


def test_the_fitted_states_stay_float32_only_the_generated_text_may_differ(
    tmp_path: Path, bfloat16_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without continuations the bfloat16 switch changes nothing at all: it applies to generation only."""
    config = load_config(write_config(tmp_path / "c.yaml", bfloat16_model, [bfloat16_model, bfloat16_model]))
    source = load_source(str(bfloat16_model))
    gates = {}
    for native in (False, True):
        request = GateRequest(
            base=source, experts=config.experts, router=RouterConfig(continuation_tokens=0), bfloat16_generation=native
        )
        gates[native] = compute_gates("fit", request).router
    assert torch.equal(gates[False], gates[True])

    writers: list[SliceCache | None] = []

    def spy(decoder: StreamedDecoder, *args: object, **kwargs: object) -> list[torch.Tensor]:
        writers.append(decoder.slice_cache)
        return greedy_continuations(decoder, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("frankenmoe.routers.prompts.greedy_continuations", spy)
    for native in (False, True):
        request = GateRequest(
            base=source, experts=config.experts, router=RouterConfig(continuation_tokens=4), bfloat16_generation=native
        )
        assert compute_gates("fit", request).router.shape == gates[False].shape
    assert [writer is not None and writer.native_bfloat16 for writer in writers] == [False, True]


@pytest.mark.parametrize(("gate_mode", "recorded"), [("fit", True), ("hidden", False)])
def test_the_manifest_records_the_generation_products_of_a_merge_that_generates(
    tmp_path: Path, bfloat16_model: Path, gate_mode: str, recorded: bool
) -> None:
    config = write_config(tmp_path / "c.yaml", bfloat16_model, [bfloat16_model, bfloat16_model], gate_mode=gate_mode)
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--no-check")
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["options"]
    if recorded:
        expected = "bfloat16" if slices.cpu_multiplies_bfloat16() else "float32"
        assert options["generation_products"] == expected
    else:
        assert "generation_products" not in options
