"""The fast paths compute what the plain ones do: the routing check run while the checkpoint is being
written equals the check run on the finished checkpoint; matrix slices spread over worker threads give
the same bits for any number of workers, and with or without the float32 weight cache; attention
applied to all sequences at once matches transformers' decoder layer run on each; the dual ridge
solve equals the primal one."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers.cache_utils import DynamicCache

from frankenmoe.analysis import routing
from frankenmoe.analysis.routing_check import RoutingCheck, check_routing
from frankenmoe.api import plan_merge
from frankenmoe.architectures.roles import MLP_PARTS
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.config.parse import load_config
from frankenmoe.config.schema import RouterConfig
from frankenmoe.decoder import slices
from frankenmoe.decoder.attention import KeyValueCache
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.generate import greedy_continuations
from frankenmoe.decoder.moe import ACTIVATIONS, MLPWeights, activation_function, sliced_mlp
from frankenmoe.decoder.slices import MatrixRows, SliceCache
from frankenmoe.errors import ModelError, OutputError
from frankenmoe.io import shards
from frankenmoe.io.safetensors import read_header, read_tensor
from frankenmoe.io.shards import ShardEntry, ShardWriter, tensor_bytes
from frankenmoe.io.written import WriteLog
from frankenmoe.merging import routing_check
from frankenmoe.merging.prepare import MergeOptions, gate_request, prepare_merge
from frankenmoe.merging.routing_check import WrittenTensors
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import GateRequest, compute_gates
from frankenmoe.routers.fit import ridge_solution
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import write_toy_model
from tests.conftest import TinyModels
from tests.support import LLAMA3_ROPE, run_cli, write_config
from tests.transformers_reference import reference_model, run_reference_layer

# --- the routing check while writing -----------------------------------------------------------------------------


class RoutedCalls:
    """Every route_prompts call of the routing check, with the thread it ran on and its result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, list[routing.PromptRouting]]] = []
        original = routing.route_prompts

        def recorded(*args: object, **kwargs: object) -> list[routing.PromptRouting]:
            result = original(*args, **kwargs)  # type: ignore[arg-type]
            self.calls.append((threading.current_thread().name, result))
            return result

        monkeypatch.setattr("frankenmoe.analysis.routing_check.route_prompts", recorded)


def merged_with_check(tmp_path: Path, config: Path, **options: object) -> tuple[Path, RoutingCheck | None]:
    out = tmp_path / "out"
    result = execute_merge(prepare_merge(config, out, MergeOptions(**options)))  # type: ignore[arg-type]
    return out, result.routing_check


def transformed_config(tmp_path: Path, tiny_models: TinyModels, gate_mode: str) -> Path:
    """Three experts: one with residual_scale and noise (its tensors go through float32), two byte copies."""
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, tiny_models.experts, gate_mode=gate_mode)
    data = yaml.safe_load(config.read_text())
    data["experts"][1]["noise_scale"] = 0.01
    data["experts"][1]["residual_scale"] = 0.5
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def assert_check_while_writing_equals_check_after(
    calls: RoutedCalls, out: Path, during: RoutingCheck | None, config: Path
) -> None:
    experts = load_config(config).experts
    assert during is not None
    assert [thread for thread, _ in calls.calls] == ["frankenmoe-check"]  # it ran while writing, once
    after = check_routing(load_checkpoint(out), experts, None)
    assert after == during
    (_, routed_during), (_, routed_after) = calls.calls
    assert len(routed_during) == len(routed_after)
    for first, second in zip(routed_during, routed_after, strict=True):
        assert first.tokens == second.tokens
        assert torch.equal(first.prompt.token_ids, second.prompt.token_ids)
        assert torch.equal(first.probabilities, second.probabilities)  # bit for bit, every layer and token


@pytest.mark.parametrize(
    ("gate_mode", "layout"), [("hidden", "classic"), ("hidden", "fused"), ("random", "classic"), ("fit", "classic")]
)
def test_the_check_while_writing_equals_the_check_of_the_written_checkpoint_with_a_transformed_expert(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, gate_mode: str, layout: str
) -> None:
    calls = RoutedCalls(monkeypatch)
    config = transformed_config(tmp_path, tiny_models, gate_mode)
    if gate_mode == "fit":
        data = yaml.safe_load(config.read_text())
        data["router"] = {"continuation_tokens": 4}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    out, during = merged_with_check(tmp_path, config, layout=layout)
    assert_check_while_writing_equals_check_after(calls, out, during, config)


def test_the_check_while_writing_equals_the_check_after_for_qwen2_moe_with_a_shared_expert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_toy_model(tmp_path / "qwen2", model_type="qwen2", base_seed=3)
    experts = [
        write_toy_model(tmp_path / f"qwen2-{index}", model_type="qwen2", base_seed=3, mlp_seed=index)
        for index in (1, 2)
    ]
    shared = write_toy_model(tmp_path / "qwen2-shared", model_type="qwen2", base_seed=3, mlp_seed=9)
    config = write_config(tmp_path / "moe.yaml", base, experts, gate_mode="hidden")
    data = yaml.safe_load(config.read_text())
    data["shared_experts"] = [{"source_model": str(shared), "positive_prompts": ["anything at all"]}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    calls = RoutedCalls(monkeypatch)
    out, during = merged_with_check(tmp_path, config)
    assert_check_while_writing_equals_check_after(calls, out, during, config)


def test_a_check_that_saw_other_routers_than_the_written_ones_runs_again_on_the_written_ones(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = RoutedCalls(monkeypatch)
    monkeypatch.setattr(routing_check.ComputedRows, "matches_written", lambda self, checkpoint: False)
    config = transformed_config(tmp_path, tiny_models, "hidden")
    with caplog.at_level("WARNING", logger="frankenmoe"):
        out, checked = merged_with_check(tmp_path, config)
    assert "saw other routers than the ones written; running it again" in caplog.text
    assert [thread for thread, _ in calls.calls] == ["frankenmoe-check", "MainThread"]
    assert checked == check_routing(load_checkpoint(out), load_config(config).experts, None)


def test_the_check_reads_the_routers_the_writer_writes(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the check used for every router is, byte for byte, what the checkpoint holds."""
    used: list[routing_check.ComputedRows] = []
    original = routing_check.ComputedRows.matches_written

    def recorded(self: routing_check.ComputedRows, checkpoint: object) -> bool:
        used.append(self)
        return original(self, checkpoint)  # type: ignore[arg-type]

    monkeypatch.setattr(routing_check.ComputedRows, "matches_written", recorded)
    out, _ = merged_with_check(tmp_path, transformed_config(tmp_path, tiny_models, "hidden"))
    (rows,) = used
    tensors = load_checkpoint(out).tensors
    assert sorted(rows.used) == sorted(name for name in tensors if name.endswith("block_sparse_moe.gate.weight"))
    for name, value in rows.used.items():
        assert torch.equal(read_tensor(tensors[name]).view(torch.uint8), value.view(torch.uint8))


def test_written_tensors_hand_out_a_tensor_only_once_its_bytes_are_written(tmp_path: Path) -> None:
    path = tmp_path / "shard.safetensors"
    first, second = torch.arange(6, dtype=torch.float32), torch.arange(6, 12, dtype=torch.float32)
    written = WriteLog()
    entries = [ShardEntry("first", "F32", (6,)), ShardEntry("second", "F32", (6,))]
    writer = ShardWriter(path, entries, {}, written)
    writer.begin("first")
    writer.write_bytes(tensor_bytes(first))
    tensors = WrittenTensors(written, ["first", "second"])
    assert torch.equal(read_tensor(tensors["first"]), first)

    found: list[torch.Tensor] = []
    reader = threading.Thread(target=lambda: found.append(read_tensor(tensors["second"])))
    reader.start()
    writer.begin("second")
    writer.write_bytes(tensor_bytes(second[:3]))
    reader.join(0.2)
    assert reader.is_alive() and not found  # still waiting: half of "second" is written
    writer.write_bytes(tensor_bytes(second[3:]))
    reader.join(10)
    assert torch.equal(found[0], second)
    writer.close()
    assert {name: tensors[name] for name in tensors} == read_header(path)  # the offsets the header gives


def test_the_check_waiting_for_a_tensor_is_released_when_the_writer_stops(tmp_path: Path) -> None:
    written = WriteLog()
    tensors = WrittenTensors(written, ["never"])
    stopper = threading.Timer(0.1, written.fail, ["The disk is full"])
    stopper.start()
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"'never' was never written: the writer stopped \(The disk is full\)"):
        tensors["never"]
    assert time.monotonic() - started < 30
    stopper.join()
    finished = WriteLog()
    finished.close()
    with pytest.raises(ModelError, match="finished without it"):
        WrittenTensors(finished, ["never"])["never"]


def test_a_merge_whose_writer_fails_ends_with_its_error_and_leaves_no_check_waiting(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routing check runs behind the writer: when the disk fills up after the first tensors, the merge
    fails with the writer's error at once, and the check's thread has ended (it never waits forever)."""
    real_write_all = shards._write_all
    writes = 0

    def fills_up(descriptor: int, data: memoryview) -> None:
        nonlocal writes
        writes += 1
        if writes > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(descriptor, data)

    monkeypatch.setattr(shards, "_write_all", fills_up)
    config = transformed_config(tmp_path, tiny_models, "hidden")
    started = time.monotonic()
    with pytest.raises(OutputError, match="The disk is full"):
        merged_with_check(tmp_path, config)
    assert time.monotonic() - started < 25  # BackgroundResult.cancel waits up to 30 s for a stuck check
    assert not [thread for thread in threading.enumerate() if thread.name == "frankenmoe-check"]
    assert not (tmp_path / "out").exists()


# --- slice workers ---------------------------------------------------------------------------------------------------


@pytest.fixture
def many_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slices, "SLICE_BYTES", 7 * 64 * 4)  # 7-row slices of the tiny models' 64-wide matrices


def with_workers(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(count))
    assert slices.slice_workers() == count


def test_slices_give_the_same_bits_for_any_number_of_workers(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, many_slices: None
) -> None:
    source = load_source(str(tiny_models.experts[0]))
    weights = MLPWeights(*(MatrixRows.whole(source.tensor(source.family.mlp_name(1, part))) for part in MLP_PARTS))
    tokens = torch.randn(37, 64, generator=torch.Generator().manual_seed(5))
    results = []
    for count in (1, 2, 3):
        with_workers(monkeypatch, count)
        results.append(sliced_mlp(tokens, weights, activation_function("silu")))
    assert len(weights.gate_proj.slice_starts) > 3
    assert all(torch.equal(result, results[0]) for result in results)
    torch.testing.assert_close(results[0], plain_mlp(tokens, weights), rtol=1e-5, atol=1e-6)


def plain_mlp(tokens: torch.Tensor, weights: MLPWeights) -> torch.Tensor:
    gate, up, down = (
        read_tensor(matrix.location).float() for matrix in (weights.gate_proj, weights.up_proj, weights.down_proj)
    )
    return (torch.nn.functional.silu(tokens @ gate.T) * (tokens @ up.T)) @ down.T


@pytest.mark.slow  # text generation and fit three times: seconds each
def test_continuations_and_fit_gates_are_the_same_for_any_number_of_workers(
    tmp_path: Path, tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, many_slices: None
) -> None:
    source = load_source(str(tiny_models.base))
    experts = load_config(write_config(tmp_path / "workers.yaml", tiny_models.base, tiny_models.experts)).experts
    tokenizer = load_tokenizer(tiny_models.base)
    prompts = [torch.tensor(tokenizer(text)["input_ids"]) for text in ("red blue", "the river ran", "seven")]
    continuations, gates = [], []
    for count in (1, 3):
        with_workers(monkeypatch, count)
        decoder = StreamedDecoder(source.config, source.tensors)
        continuations.append([c.tolist() for c in greedy_continuations(decoder, prompts, 5, frozenset())])
        request = GateRequest(base=source, experts=experts, router=RouterConfig(continuation_tokens=3))
        gates.append(compute_gates("fit", request).router)
    assert continuations[0] == continuations[1]
    assert torch.equal(gates[0], gates[1])


def test_fit_gates_are_identical_from_run_to_run(tmp_path: Path, tiny_models: TinyModels) -> None:
    source = load_source(str(tiny_models.base))
    experts = load_config(write_config(tmp_path / "twice.yaml", tiny_models.base, tiny_models.experts)).experts
    request = GateRequest(base=source, experts=experts, router=RouterConfig(continuation_tokens=4))
    assert torch.equal(compute_gates("fit", request).router, compute_gates("fit", request).router)


# --- attention for all sequences at once -----------------------------------------------------------------------------

FAMILIES = {
    "mistral": {},
    "mistral-sliding-window": {"sliding_window": 3},
    "llama-with-biases": {"attention_bias": True},
    "llama-llama3-rope": {"rope_parameters": LLAMA3_ROPE},
    "qwen2-yarn-rope": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
    "qwen3": {},
}
"""Every family, and the attention variants the streamed decoder computes itself: a sliding window,
biases, rope scaling (llama3's frequencies, yarn's scaled cos and sin), q/k norms."""


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_for_all_sequences_at_once_matches_the_transformers_layer_on_each(
    tmp_path: Path, family: str, many_slices: None
) -> None:
    model_type = family.split("-")[0]
    folder = write_toy_model(tmp_path / family, model_type=model_type, extra_config=FAMILIES[family], weight_std=0.2)
    source = load_source(str(folder))
    decoder = StreamedDecoder(source.config, source.tensors)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 32000, (length,), generator=generator) for length in (5, 1, 9)]
    caches = [KeyValueCache() for _ in sequences]
    reference_caches = [DynamicCache() for _ in sequences]
    reference = reference_model(folder)
    reference.model.layers[1].mlp = NoMLP()
    for step in range(2):
        # First the whole sequences, then one new token each behind the caches.
        hidden = [decoder.embed(tokens if step == 0 else tokens[-1:] + 1) for tokens in sequences]
        together = decoder.attend(1, hidden, caches)
        for state, cache, output in zip(hidden, reference_caches, together, strict=True):
            alone = run_reference_layer(reference, 1, state, cache)
            torch.testing.assert_close(output.hidden, alone.hidden, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(output.router_input, alone.router_input, rtol=1e-5, atol=1e-5)


class NoMLP(torch.nn.Module):
    """Stands in for the reference layer's MLP, so its output is the residual stream after attention."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


# --- the dual ridge solve ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [40, 300])
def test_the_ridge_solution_is_the_primal_one_in_either_form(tokens: int) -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 120, generator=generator, dtype=torch.float64)
    y = torch.rand(tokens, 4, generator=generator, dtype=torch.float64)
    w = torch.rand(tokens, 1, generator=generator, dtype=torch.float64) + 0.1
    gram = x.T @ (w * x)
    ridge = 0.05 * torch.trace(gram) / 120
    primal = torch.linalg.solve(gram + ridge * torch.eye(120, dtype=torch.float64), x.T @ (w * y))
    torch.testing.assert_close(ridge_solution(x, y, w, 0.05), primal, rtol=1e-9, atol=1e-12)


# --- the float32 weight cache ------------------------------------------------------------------------------------------


@pytest.mark.slow  # text generation and fit twice per budget: seconds each
@pytest.mark.parametrize("budget", [0, 64 * 1024, 10**9])
def test_continuations_and_fit_gates_are_the_same_with_any_weight_cache(
    tmp_path: Path, tiny_models: TinyModels, many_slices: None, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """Nothing kept, some slices kept (the budget runs out part way), every slice kept: the same bits."""
    source = load_source(str(tiny_models.base))
    experts = load_config(write_config(tmp_path / "cache.yaml", tiny_models.base, tiny_models.experts)).experts
    router = RouterConfig(continuation_tokens=4)
    plain = compute_gates("fit", GateRequest(base=source, experts=experts, router=router, weight_cache_bytes=0))
    kept: list[SliceCache] = []
    original = SliceCache.__init__

    def recorded(self: SliceCache, budget: int = 0, native_bfloat16: bool = False) -> None:
        original(self, budget, native_bfloat16)
        kept.append(self)

    monkeypatch.setattr(SliceCache, "__init__", recorded)
    cached = compute_gates("fit", GateRequest(base=source, experts=experts, router=router, weight_cache_bytes=budget))
    assert torch.equal(plain.router, cached.router)
    (cache,) = kept  # text generation's, the only pass that reads a slice more than once
    assert cache.budget == budget
    assert (0 < cache.used <= budget) if budget else cache.used == 0


def test_the_weight_cache_option_reaches_the_router_computation(tmp_path: Path, tiny_models: TinyModels) -> None:
    config = write_config(tmp_path / "cache.yaml", tiny_models.base, tiny_models.experts, gate_mode="fit")
    prepared = plan_merge(config, tmp_path / "out", weight_cache="6GB")
    assert prepared.options.weight_cache_bytes == 6 * 10**9
    assert gate_request(prepared.plan, prepared.options).weight_cache_bytes == 6 * 10**9
    assert gate_request(prepared.plan, plan_merge(config, tmp_path / "out").options).weight_cache_bytes == 0


def test_a_weight_cache_that_is_not_a_size_is_refused_before_anything_is_read(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    config = write_config(tmp_path / "cache.yaml", tiny_models.base, tiny_models.experts, gate_mode="fit")
    result = run_cli("merge", config, tmp_path / "out", "--weight-cache", "lots")
    assert result.exit_code == 2
    assert "Weight cache 'lots' is not a size" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_computes_what_transformers_gives_that_name(name: str) -> None:
    from transformers.activations import ACT2FN

    values = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(activation_function(name)(values), ACT2FN[name](values), rtol=0, atol=0)


def test_an_activation_the_passes_do_not_know_is_refused_with_the_way_out() -> None:
    with pytest.raises(ModelError, match=r"hidden_act 'gelu_new' .* gate_mode: random and --no-check"):
        activation_function("gelu_new")
