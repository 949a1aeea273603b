"""Experts with a different vocabulary, and the model card's hub metadata (base_model, tags)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from frankenmoe.config.parse import parse_config
from frankenmoe.errors import ModelError
from frankenmoe.merging.card import model_card
from frankenmoe.merging.plan import MergePlan
from frankenmoe.merging.planning import build_plan
from frankenmoe.merging.prepare import load_sources
from frankenmoe.sources.model import SourceModel, check_compatible, load_source
from frankenmoe.testing.toymodels import SHAPES, write_toy_model
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

ADDED_TOKENS = 2


@pytest.fixture(scope="module")
def wider_vocabulary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune of the tiny base that added two tokens (vocab 32002), as many Mistral-7B chat fine-tunes did."""
    shape = dataclasses.replace(SHAPES["tiny"], vocab_size=SHAPES["tiny"].vocab_size + ADDED_TOKENS)
    return write_toy_model(tmp_path_factory.mktemp("vocab") / "chat-expert", shape=shape, mlp_seed=11)


def test_an_expert_with_added_tokens_is_accepted_with_a_warning(
    tiny_models: TinyModels, wider_vocabulary: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = load_source(str(tiny_models.base))

    with caplog.at_level(logging.WARNING, logger="frankenmoe"):
        check_compatible(base, load_source(str(wider_vocabulary)), "experts[1]")

    warning = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert f"experts[1] ({wider_vocabulary})" in warning
    assert "32002 tokens" in warning and "32000" in warning
    assert f"its {ADDED_TOKENS} added tokens are not in the base model's tokenizer" in warning


def test_an_expert_with_added_tokens_has_only_its_mlps_checked(tiny_models: TinyModels, wider_vocabulary: Path) -> None:
    # Its embeddings and lm_head are [32002, hidden], which the base's shapes would refuse; they are never read.
    config = parse_config(
        yaml.safe_dump(
            {
                "base_model": str(tiny_models.base),
                "experts": [{"source_model": str(tiny_models.experts[0])}, {"source_model": str(wider_vocabulary)}],
                "gate_mode": "random",
            }
        )
    )

    _, experts, _ = load_sources(config)

    assert experts[1].shape.vocab_size == 32002


def test_other_dimensions_are_still_refused_when_the_vocabulary_also_differs(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    shape = dataclasses.replace(SHAPES["tiny"], vocab_size=32001, intermediate_size=96)
    odd = write_toy_model(tmp_path / "odd", shape=shape)

    with pytest.raises(ModelError, match="intermediate_size is 96 in the expert but 128 in the base"):
        check_compatible(load_source(str(tiny_models.base)), load_source(str(odd)), "experts[0]")


def test_a_merge_with_an_added_token_expert_succeeds_and_its_card_says_so(
    tiny_models: TinyModels, wider_vocabulary: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "moe.yaml", tiny_models.base, [tiny_models.experts[0], wider_vocabulary])

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "added tokens are not in the base model's tokenizer" in result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Vocabulary" in card
    assert f"| 1 | `{wider_vocabulary}` | 32002 | {ADDED_TOKENS} added |" in card


# --- the card's YAML header -----------------------------------------------------------------------------------------


def card_header(card: str) -> dict[str, object]:
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert isinstance(header, dict)
    return header


def local_plan(tiny_models: TinyModels) -> MergePlan:
    text = yaml.safe_dump(
        {
            "base_model": str(tiny_models.base),
            "experts": [{"source_model": str(folder)} for folder in (*tiny_models.experts[:2], tiny_models.base)],
            "gate_mode": "random",
        }
    )
    config = parse_config(text)
    base, experts, _ = load_sources(config)
    return build_plan(config, base, experts)


def from_hub_cache(source: SourceModel, reference: str, cache: Path) -> SourceModel:
    """The same model as if `reference` (`org/name` or `org/name@revision`) had been resolved from a
    Hugging Face cache at `cache`."""
    repo_id = reference.partition("@")[0]
    snapshot = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "0123abcd"
    return dataclasses.replace(source, reference=reference, path=snapshot)


def test_card_header_lists_hub_sources_as_base_model_of_a_merge(tiny_models: TinyModels, tmp_path: Path) -> None:
    plan = local_plan(tiny_models)
    cache = tmp_path / "hub"
    base = from_hub_cache(plan.base, "org/base-7b", cache)
    experts = (
        from_hub_cache(plan.experts[0], "org/coder-7b", cache),
        from_hub_cache(plan.experts[1], "org/story-7b@v2", cache),
        base,
    )
    plan = dataclasses.replace(plan, base=base, experts=experts)

    header = card_header(model_card(plan, "base_model: org/base-7b\n"))

    assert header["base_model"] == ["org/base-7b", "org/coder-7b", "org/story-7b"]
    assert header["base_model_relation"] == "merge"
    assert header["library_name"] == "transformers"


def test_card_header_leaves_local_folders_out_of_base_model(tiny_models: TinyModels) -> None:
    plan = local_plan(tiny_models)

    card = model_card(plan, "base_model: ./base\n")
    header = card_header(card)

    assert "base_model" not in header and "base_model_relation" not in header
    assert "local folders" in card.split("---\n", 2)[2]


def test_card_header_tags_the_sources_families(tiny_models: TinyModels) -> None:
    header = card_header(model_card(local_plan(tiny_models), ""))

    assert header["tags"] == ["moe", "frankenmoe", "merge", "mixtral", "mistral"]
