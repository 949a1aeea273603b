"""Gate modes and router options: the exact rules of hidden, fit, pooling, scale, input, sequential."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from frankenmoe.analysis.routing import route_prompts
from frankenmoe.analysis.routing_stats import routing_accuracy
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.config.constants import CONTINUING_GATE_MODES, GATE_MODES, PROMPT_GATE_MODES
from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import ExpertConfig, RouterConfig
from frankenmoe.decoder.decoder import StreamedDecoder, router_inputs_by_layer
from frankenmoe.errors import ConfigError
from frankenmoe.io.safetensors import read_tensor
from frankenmoe.merging.prepare import MergeOptions, prepare_merge
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import GATE_FUNCTIONS, GateRequest, Gates, compute_gates
from frankenmoe.routers.prompts import LEAD_IN_TEXT, collect_expert_prompts, encode_prompts, load_tokenizer
from frankenmoe.routers.request import GateProgress
from frankenmoe.sources.model import load_source
from tests.conftest import TinyModels
from tests.support import write_config

# Disjoint vocabularies of single-token words, so the experts' prompts are separable token by token.
SEPARABLE_VOCABULARY = (
    ("red", "blue", "green", "black", "white", "yellow"),
    ("seven", "eight", "nine", "twelve", "twenty", "hundred"),
    ("river", "mountain", "forest", "desert", "ocean", "valley"),
)
TRAINING_PROMPTS = [[" ".join(words[:3]), " ".join(words[2:5]), " ".join(words[3:])] for words in SEPARABLE_VOCABULARY]
HELD_OUT_PROMPTS = [
    [" ".join(reversed(words[1:4])), f"{words[5]} {words[0]} {words[4]}"] for words in SEPARABLE_VOCABULARY
]


def gate_request(
    models: TinyModels, prompts: list[list[str]], router: RouterConfig, sequential_experts: bool = True
) -> GateRequest:
    experts = tuple(
        ExpertConfig(source_model=str(path), positive_prompts=tuple(texts))
        for path, texts in zip(models.experts, prompts, strict=True)
    )
    return GateRequest(
        base=load_source(str(models.base)),
        experts=experts,
        router=router,
        expert_models=tuple(load_source(str(path)) for path in models.experts) if sequential_experts else (),
    )


def base_router_inputs(request: GateRequest) -> list[list[torch.Tensor]]:
    """Every layer's router inputs of every prompt, computed in the base model by the streamed decoder."""
    prompts = collect_expert_prompts(request.base, request.experts)
    decoder = StreamedDecoder(request.base.config, request.base.tensors)
    return [inputs for _, inputs in router_inputs_by_layer(decoder, [prompt.token_ids for prompt in prompts.prompts])]


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def test_fit_routes_separable_held_out_prompts_perfectly(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "fit.yaml",
        tiny_models.base,
        tiny_models.experts,
        prompts=TRAINING_PROMPTS,
        gate_mode="fit",
        dtype="float32",
        # A random-weight model's continuations are random tokens: they would only blur the separable words.
        router={"ridge_lambda": 0.01, "sequential": True, "continuation_tokens": 0},
    )
    out = tmp_path / "out"
    options = MergeOptions()
    execute_merge(prepare_merge(config, out, options))

    texts = [text for prompts in HELD_OUT_PROMPTS for text in prompts]
    labels = [expert for expert, prompts in enumerate(HELD_OUT_PROMPTS) for _ in prompts]
    accuracy = routing_accuracy(route_prompts(load_checkpoint(out), texts), labels)

    assert accuracy.prompt_accuracy == 1.0
    assert accuracy.token_accuracy == 1.0


def test_fit_is_deterministic_and_finite_with_one_single_token_prompt_per_expert(tiny_models: TinyModels) -> None:
    request = gate_request(tiny_models, [["red"], ["seven"], ["river"]], RouterConfig(ridge_lambda=1e-6))

    first, second = compute_gates("fit", request).router, compute_gates("fit", request).router

    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_ridge_lambda_trades_fitting_the_tokens_for_the_weighted_class_means(tiny_models: TinyModels) -> None:
    fixed = RouterConfig(scale=1.0, center=False)
    strong = compute_gates(
        "fit", gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0, ridge_lambda=1e6, center=False))
    ).router
    weak = compute_gates(
        "fit", gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0, ridge_lambda=1e-4))
    ).router
    request = gate_request(tiny_models, TRAINING_PROMPTS, fixed)
    prompts = collect_expert_prompts(request.base, request.experts)
    layer0 = base_router_inputs(request)[0]

    # With a huge lambda the solution tends to Xᵀ D Y / λ: each row points along the mean over its
    # expert's prompts of each prompt's mean token.
    content = [state[prompt.content_mask] for state, prompt in zip(layer0, prompts.prompts, strict=True)]
    means = torch.stack(
        [torch.stack([content[index].mean(dim=0) for index in indices]).mean(dim=0) for indices in prompts.positive]
    )
    for expert in range(3):
        assert torch.nn.functional.cosine_similarity(strong[0, expert], means[expert], dim=0) > 0.999
    # A weak ridge fits the training tokens: every one scores highest for its own expert.
    for expert, indices in enumerate(prompts.positive):
        for index in indices:
            assert ((content[index] @ weak[0].T).argmax(dim=-1) == expert).all()
    assert not torch.allclose(unit(strong[0, 0]), unit(weak[0, 0]), atol=1e-3)


def test_hidden_rows_are_the_normalised_mean_of_pooled_router_inputs(tiny_models: TinyModels) -> None:
    for pooling in ("mean", "last"):
        request = gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(pooling=pooling, scale=1.0, center=False))
        gates = compute_gates("hidden", request).router
        prompts = collect_expert_prompts(request.base, request.experts)
        for layer, inputs in enumerate(base_router_inputs(request)):
            for expert, indices in enumerate(prompts.positive):
                pooled = [
                    inputs[index][prompts.prompts[index].content_mask].mean(dim=0)
                    if pooling == "mean"
                    else inputs[index][prompts.prompts[index].content_mask][-1]
                    for index in indices
                ]
                expected = unit(torch.stack(pooled).mean(dim=0))
                torch.testing.assert_close(gates[layer, expert], expected, atol=1e-5, rtol=1e-5)


def test_pooling_last_and_mean_give_different_rows(tiny_models: TinyModels) -> None:
    mean = compute_gates("hidden", gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(pooling="mean"))).router
    last = compute_gates("hidden", gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(pooling="last"))).router

    assert not torch.allclose(mean, last, atol=1e-3)


def test_residual_input_uses_the_stream_entering_the_layer(tiny_models: TinyModels) -> None:
    request = gate_request(
        tiny_models, TRAINING_PROMPTS, RouterConfig(input="residual", pooling="last", scale=1.0, center=False)
    )
    gates = compute_gates("hidden", request).router
    prompts = collect_expert_prompts(request.base, request.experts)
    embeddings = load_source(str(tiny_models.base))
    decoder = StreamedDecoder(embeddings.config, embeddings.tensors)

    # Layer 0's residual input is the token embedding itself.
    for expert, indices in enumerate(prompts.positive):
        expected = unit(
            torch.stack([decoder.embed(prompts.prompts[index].token_ids)[0, -1] for index in indices]).mean(dim=0)
        )
        torch.testing.assert_close(gates[0, expert], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["hidden", "fit"])
def test_scale_auto_sets_the_logit_spread_and_a_number_sets_the_row_norm(tiny_models: TinyModels, mode: str) -> None:
    auto = gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(logit_std=2.5))
    prompts = collect_expert_prompts(auto.base, auto.experts)
    gates = compute_gates(mode, auto).router
    for layer, inputs in enumerate(base_router_inputs(auto)):
        tokens = torch.cat([state[prompt.content_mask] for state, prompt in zip(inputs, prompts.prompts, strict=True)])
        spread = (tokens @ gates[layer].T).std(dim=-1, unbiased=False).mean()
        assert float(spread) == pytest.approx(2.5, rel=1e-4)

    fixed = compute_gates(mode, gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=3.0))).router
    unscaled = compute_gates(mode, gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0))).router
    torch.testing.assert_close(fixed, unscaled * 3.0)
    if mode == "hidden":
        torch.testing.assert_close(fixed.norm(dim=-1), torch.full(fixed.shape[:2], 3.0))


def test_sequential_states_are_the_merged_models_own(tiny_models: TinyModels, tmp_path: Path) -> None:
    """Rows rebuilt from the written checkpoint's own router inputs equal the rows it was written with."""
    config = write_config(
        tmp_path / "seq.yaml",
        tiny_models.base,
        tiny_models.experts,
        prompts=TRAINING_PROMPTS,
        dtype="float32",
        router={"sequential": True, "scale": 1.0, "center": False},
    )
    out = tmp_path / "out"
    options = MergeOptions()
    execute_merge(prepare_merge(config, out, options))
    checkpoint = load_checkpoint(out)
    written = torch.stack(
        [read_tensor(checkpoint.tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]) for layer in range(2)]
    )

    request = gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0, center=False))
    prompts = collect_expert_prompts(request.base, request.experts)
    merged = StreamedDecoder(checkpoint.config, checkpoint.tensors)
    for layer, inputs in router_inputs_by_layer(merged, [prompt.token_ids for prompt in prompts.prompts]):
        for expert, indices in enumerate(prompts.positive):
            expected = unit(
                torch.stack([inputs[index][prompts.prompts[index].content_mask].mean(dim=0) for index in indices]).mean(
                    dim=0
                )
            )
            torch.testing.assert_close(written[layer, expert], expected, atol=1e-5, rtol=1e-5)

    # The base model's states agree at layer 0 only; after it, the experts' MLPs make them differ.
    base_states = compute_gates("hidden", request).router
    torch.testing.assert_close(base_states[0], written[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base_states[1], written[1], atol=1e-4)


def test_router_options_parse_and_reject_bad_values() -> None:
    text = (
        "base_model: b\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n  - source_model: e\n"
        "    positive_prompts: [x]\nrouter:\n"
    )
    config = parse_config(text + "  scale: auto\n  input: residual\n  logit_std: 2\n", "t.yaml")
    assert config.router == RouterConfig(scale=None, input="residual", logit_std=2.0)
    off = parse_config(text + "  center: false\n  lead_in: false\n", "t.yaml").router
    assert (off.center, off.lead_in) == (False, False)
    assert parse_config(text + "  scale: 4\n", "t.yaml").router.scale == 4.0
    for bad in (
        "  input: embeddings\n",
        "  logit_std: 0\n",
        "  scale: loud\n",
        "  center: yes please\n",
        "  lead_in: 1\n",
    ):
        with pytest.raises(ConfigError):
            parse_config(text + bad, "t.yaml")


@pytest.mark.parametrize("mode", ["hidden", "fit"])
def test_center_makes_every_row_orthogonal_to_the_mean_prompt_token(tiny_models: TinyModels, mode: str) -> None:
    centred = gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0))
    plain = compute_gates(
        mode, gate_request(tiny_models, TRAINING_PROMPTS, RouterConfig(scale=1.0, center=False))
    ).router
    gates = compute_gates(mode, centred).router
    prompts = collect_expert_prompts(centred.base, centred.experts)
    for layer, inputs in enumerate(base_router_inputs(centred)):
        mean_token = unit(
            torch.cat([state[prompt.content_mask] for state, prompt in zip(inputs, prompts.prompts, strict=True)]).mean(
                dim=0
            )
        )
        cosines = torch.nn.functional.cosine_similarity(gates[layer], mean_token.unsqueeze(0), dim=-1)
        assert cosines.abs().max() < 1e-4
        # Without centring the rows lean on the shared direction, which is what biases the routing.
        assert (plain[layer] @ mean_token).abs().max() / plain[layer].norm(dim=-1).max() > 0.05
        if mode == "hidden":
            expected = plain[layer] - (plain[layer] @ mean_token).unsqueeze(-1) * mean_token
            torch.testing.assert_close(
                gates[layer], expected / expected.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5
            )


def copy_without_start_token(model: Path, folder: Path) -> Path:
    """The model in `folder`, with a tokenizer that adds no BOS (as SmolLM2's adds none)."""
    shutil.copytree(model, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": False}))
    return folder


def test_lead_in_puts_a_newline_before_prompts_only_when_the_tokenizer_adds_no_start_token(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    no_bos = copy_without_start_token(tiny_models.base, tmp_path / "no-bos")
    config = load_source(str(no_bos)).config
    tokenizer = load_tokenizer(no_bos)
    newline = tokenizer(LEAD_IN_TEXT, add_special_tokens=False)["input_ids"]
    plain = encode_prompts(no_bos, config, ["red blue"])[0]
    led = encode_prompts(no_bos, config, ["red blue"], lead_in=True)[0]

    assert plain.content_mask.all()
    assert led.token_ids.tolist() == newline + plain.token_ids.tolist()
    assert led.content_mask.tolist() == [False] * len(newline) + [True] * len(plain.token_ids)
    with_bos = [encode_prompts(tiny_models.base, config, ["red blue"], lead_in=flag)[0] for flag in (False, True)]
    assert with_bos[0].token_ids.tolist() == with_bos[1].token_ids.tolist()
    assert not with_bos[0].content_mask[0]

    # The rows follow: built from the prompts' states behind the newline, not from the sink position.
    experts = tuple(ExpertConfig(str(no_bos), tuple(texts)) for texts in TRAINING_PROMPTS)
    base = load_source(str(no_bos))
    on, off = (
        compute_gates("hidden", GateRequest(base=base, experts=experts, router=RouterConfig(lead_in=flag))).router
        for flag in (True, False)
    )
    assert not torch.allclose(on, off, atol=1e-3)


def test_every_gate_mode_the_config_accepts_has_exactly_one_router_function() -> None:
    # The config (a layer below the routers) owns the names; the registry must cover exactly those.
    assert set(GATE_FUNCTIONS) == set(GATE_MODES)
    assert set(GATE_MODES) >= PROMPT_GATE_MODES and CONTINUING_GATE_MODES <= PROMPT_GATE_MODES


def test_gate_progress_wakes_a_reader_when_rows_are_published_and_releases_it_when_the_computation_ends() -> None:
    progress, gates, seen = GateProgress(), Gates(torch.zeros(2, 3, 4)), []
    reader = threading.Thread(target=lambda: seen.append(progress.wait_for(0)))
    reader.start()
    progress.publish(0, gates)
    reader.join(timeout=10)
    assert not reader.is_alive() and seen == [gates]
    waiting_for_layer_1 = threading.Thread(target=lambda: seen.append(progress.wait_for(1)))
    waiting_for_layer_1.start()
    progress.close()  # the computation ended without publishing layer 1: its result says why
    waiting_for_layer_1.join(timeout=10)
    assert not waiting_for_layer_1.is_alive() and seen == [gates, None]
