"""router.continuation_tokens: the base model continues each prompt, and routers are built from both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from frankenmoe.config.constants import AUTO_CONTINUATION_TOKENS
from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import ExpertConfig, RouterConfig
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.decoder.generate import greedy_continuations
from frankenmoe.errors import ConfigError
from frankenmoe.merging.prepare import MergeOptions, prepare_merge
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import GateRequest, compute_gates
from frankenmoe.routers.hidden import LayerStates, layerwise_gates
from frankenmoe.routers.prompts import ExpertPrompts, collect_expert_prompts, load_tokenizer, with_continuations
from frankenmoe.runtime.memory import keep_large_buffers_out_of_the_heap, reuse_large_buffers
from frankenmoe.sources.model import load_source
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

PROMPTS = ["red blue green", "seven", "the river ran past the mountain and the forest"]
NO_STOP: frozenset[int] = frozenset()


def token_ids(model: Path, text: str) -> torch.Tensor:
    return torch.tensor(load_tokenizer(model)(text)["input_ids"], dtype=torch.long)


def transformers_greedy(model: Path, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    output = reference.generate(
        prompt.unsqueeze(0),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


def decoder_for(model: Path, **config_changes: object) -> StreamedDecoder:
    source = load_source(str(model))
    return StreamedDecoder({**source.config, **config_changes}, source.tensors)


@pytest.mark.parametrize("family", ["mistral", "llama_tied"])
def test_greedy_continuations_equal_transformers_generate(tiny_models: TinyModels, family: str) -> None:
    model = tiny_models.base if family == "mistral" else tiny_models.llama_tied
    prompts = [token_ids(model, text) for text in PROMPTS]

    continuations = greedy_continuations(decoder_for(model), prompts, 6, NO_STOP)

    assert [c.tolist() for c in continuations] == [transformers_greedy(model, p, 6) for p in prompts]


def test_cached_steps_keep_the_sliding_window(tiny_models: TinyModels, tmp_path: Path) -> None:
    windowed = tmp_path / "windowed"
    shutil.copytree(tiny_models.base, windowed)
    config = json.loads((windowed / "config.json").read_text())
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    prompt = token_ids(windowed, PROMPTS[2])

    [continuation] = greedy_continuations(decoder_for(windowed), [prompt], 5, NO_STOP)
    [unwindowed] = greedy_continuations(decoder_for(tiny_models.base), [prompt], 5, NO_STOP)

    assert continuation.tolist() == transformers_greedy(windowed, prompt, 5)
    assert continuation.tolist() != unwindowed.tolist()


def test_a_continuation_ends_before_its_first_stop_token(tiny_models: TinyModels) -> None:
    prompt = token_ids(tiny_models.base, PROMPTS[0])
    [free] = greedy_continuations(decoder_for(tiny_models.base), [prompt], 8, NO_STOP)
    stop_at = next(index for index in range(1, len(free)) if free[index] not in free[:index])

    [stopped] = greedy_continuations(decoder_for(tiny_models.base), [prompt], 8, {int(free[stop_at])})

    assert stopped.tolist() == free[:stop_at].tolist()


def test_a_continuation_ends_where_the_context_window_does(tiny_models: TinyModels) -> None:
    short, long = token_ids(tiny_models.base, PROMPTS[1]), token_ids(tiny_models.base, PROMPTS[2])
    decoder = decoder_for(tiny_models.base, max_position_embeddings=len(short) + 3)

    continuations = greedy_continuations(decoder, [short, long], 8, NO_STOP)

    assert [len(c) for c in continuations] == [3, max(0, len(short) + 3 - len(long))]


def expert_prompts(models: TinyModels, lead_in: bool = True) -> tuple[GateRequest, ExpertPrompts]:
    experts = tuple(
        ExpertConfig(source_model=str(path), positive_prompts=(text,))
        for path, text in zip(models.experts, PROMPTS, strict=True)
    )
    request = GateRequest(base=load_source(str(models.base)), experts=experts, router=RouterConfig())
    return request, collect_expert_prompts(request.base, request.experts, lead_in)


def test_continued_prompts_are_the_prompt_then_what_the_model_wrote_all_of_it_content(
    tiny_models: TinyModels,
) -> None:
    request, prompts = expert_prompts(tiny_models)
    decoder = StreamedDecoder(request.base.config, request.base.tensors)

    continued = with_continuations(prompts, request.base, decoder, 5, show_progress=False)

    expected = greedy_continuations(decoder, [p.token_ids for p in prompts.prompts], 5, frozenset({2}))
    for before, after, tail in zip(prompts.prompts, continued.prompts, expected, strict=True):
        assert after.text == before.text
        assert torch.equal(after.token_ids, torch.cat([before.token_ids, tail]))
        assert torch.equal(
            after.content_mask, torch.cat([before.content_mask, torch.ones(len(tail), dtype=torch.bool)])
        )
    assert (continued.positive, continued.negative) == (prompts.positive, prompts.negative)


def test_gate_modes_build_their_rows_from_the_continued_prompts(tiny_models: TinyModels) -> None:
    request, prompts = expert_prompts(tiny_models)
    seen: list[ExpertPrompts] = []

    def record(states: LayerStates, given: ExpertPrompts, _request: GateRequest) -> torch.Tensor:
        seen.append(given)
        return torch.eye(len(given.positive), len(states.router_inputs[0][0]))

    continuing = GateRequest(request.base, request.experts, RouterConfig(continuation_tokens=4))
    layerwise_gates(continuing, record)

    decoder = StreamedDecoder(request.base.config, request.base.tensors)
    expected = with_continuations(prompts, request.base, decoder, 4, show_progress=False)
    assert all(
        torch.equal(got.token_ids, want.token_ids)
        for layer_prompts in seen
        for got, want in zip(layer_prompts.prompts, expected.prompts, strict=True)
    )
    assert len(seen) == request.num_layers


def test_continuations_change_fit_rows_and_stay_deterministic(tiny_models: TinyModels) -> None:
    request, _ = expert_prompts(tiny_models)
    with_text = GateRequest(request.base, request.experts, RouterConfig(continuation_tokens=4))

    first, second = compute_gates("fit", with_text).router, compute_gates("fit", with_text).router
    without = compute_gates("fit", request).router

    assert torch.equal(first, second)
    assert not torch.allclose(first, without)


CONFIG = """
base_model: base
gate_mode: {mode}
experts:
  - source_model: a
    positive_prompts: ["x"]
  - source_model: b
    positive_prompts: ["y"]
"""


@pytest.mark.parametrize("mode", ["fit", "hidden", "cheap_embed", "random"])
def test_continuation_tokens_default_to_the_gate_modes_benchmarked_value(mode: str) -> None:
    config = parse_config(CONFIG.format(mode=mode), "t.yaml")
    explicit_auto = parse_config(CONFIG.format(mode=mode) + "router: {continuation_tokens: auto}\n", "t.yaml")

    assert config.router.continuation_tokens == AUTO_CONTINUATION_TOKENS.get(mode, 0)
    assert explicit_auto.router == config.router
    assert AUTO_CONTINUATION_TOKENS == {"fit": 32}


def test_continuation_tokens_can_be_set_or_turned_off() -> None:
    on = parse_config(CONFIG.format(mode="hidden") + "router: {continuation_tokens: 16}\n", "t.yaml")
    off = parse_config(CONFIG.format(mode="fit") + "router: {continuation_tokens: 0}\n", "t.yaml")

    assert (on.router.continuation_tokens, off.router.continuation_tokens) == (16, 0)


@pytest.mark.parametrize(
    ("mode", "value", "message"),
    [
        ("fit", "-1", "between 0 and 1024"),
        ("fit", "5000", "between 0 and 1024"),
        ("fit", "many", "whole number"),
        ("fit", "true", "whole number"),
        ("cheap_embed", "8", "does not run the model on the prompts"),
        ("random", "8", "does not run the model on the prompts"),
    ],
)
def test_bad_continuation_tokens_are_refused_with_the_fix(mode: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(CONFIG.format(mode=mode) + f"router: {{continuation_tokens: {value}}}\n", "t.yaml")
    assert "router.continuation_tokens" in str(error.value)


def test_dry_run_and_model_card_say_what_the_routers_are_built_from(tiny_models: TinyModels, tmp_path: Path) -> None:
    prompts = [["red blue"], ["seven eight"], ["river"]]
    fit = write_config(tmp_path / "fit.yaml", tiny_models.base, tiny_models.experts, prompts=prompts, gate_mode="fit")
    hidden = write_config(tmp_path / "hidden.yaml", tiny_models.base, tiny_models.experts, prompts=prompts)
    options = MergeOptions()
    execute_merge(prepare_merge(fit, tmp_path / "out", options))

    continued = "3 positive, 0 negative; each continued by up to 32 tokens the base model writes after it (greedy)"
    assert f"router prompts: {continued}" in run_cli("merge", fit, tmp_path / "dry", "--dry-run").output
    assert "router prompts: 3 positive, 0 negative\n" in run_cli("merge", hidden, tmp_path / "dry", "--dry-run").output
    assert f"| router prompts | {continued} |" in (tmp_path / "out" / "README.md").read_text()


def test_continuations_do_not_depend_on_the_large_buffer_policy(tiny_models: TinyModels) -> None:
    prompts = [token_ids(tiny_models.base, text) for text in PROMPTS]
    decoder = decoder_for(tiny_models.base)
    with reuse_large_buffers():
        reused = greedy_continuations(decoder, prompts, 4, NO_STOP)

    keep_large_buffers_out_of_the_heap()
    own_mappings = greedy_continuations(decoder, prompts, 4, NO_STOP)

    assert [c.tolist() for c in own_mappings] == [c.tolist() for c in reused]
