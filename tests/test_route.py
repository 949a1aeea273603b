"""`frankenmoe route` and the merge's routing check, on checkpoints whose correct routing is known exactly.

The hand-routed Mixtral is built with transformers itself (a checkpoint "made by another tool"):
attention outputs and expert outputs are zero, so every layer's router input is the normalised
token embedding; embedding row t points along axis t mod 4, and layer l's gate row for expert e
along axis (e + l) mod 4. Token t therefore goes to expert (t - l) mod 4 in layer l, with a
softmax probability fixed by the construction.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

from frankenmoe.analysis.labels import resolve_expert
from frankenmoe.architectures.tables import MIXTRAL_LAYOUTS
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.testing.toymodels import TOKENIZER_CONFIG, mistral_tokenizer_model
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

EXPERTS = 4
LAYERS = 3
HIDDEN = 8
GATE_SCALE = 1.0
PROMPTS = (
    "def sort(items): return sorted(items)",
    "once upon a time there was a dragon",
    "solve the equation x + 2 = 5",
)
"""Chosen so that each has a unique favourite expert under the construction (the accuracy test checks)."""


def expected_top_expert(token: int, layer: int) -> int:
    return (token - layer) % EXPERTS


def winner_probability() -> float:
    """The router input is one-hot times sqrt(hidden) (RMSNorm of a one-hot vector), so the winning
    logit is GATE_SCALE * sqrt(hidden) and every other logit is 0."""
    winning_logit = GATE_SCALE / math.sqrt(1 / HIDDEN + 1e-5)
    return math.exp(winning_logit) / (math.exp(winning_logit) + EXPERTS - 1)


def write_hand_routed_mixtral(folder: Path) -> Path:
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=HIDDEN,
        intermediate_size=4,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    state = model.state_dict()
    with torch.no_grad():
        embedding = torch.zeros(config.vocab_size, HIDDEN)
        embedding[torch.arange(config.vocab_size), torch.arange(config.vocab_size) % EXPERTS] = 1.0
        state["model.embed_tokens.weight"].copy_(embedding)
        for layer in range(LAYERS):
            prefix = f"model.layers.{layer}."
            state[prefix + "self_attn.o_proj.weight"].zero_()
            state[prefix + "mlp.experts.down_proj"].zero_()
            state[prefix + "post_attention_layernorm.weight"].fill_(1.0)
            gate = torch.zeros(EXPERTS, HIDDEN)
            for expert in range(EXPERTS):
                gate[expert, (expert + layer) % EXPERTS] = GATE_SCALE
            state[prefix + "mlp.gate.weight"].copy_(gate)
    model.save_pretrained(folder)
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


def convert_to_fused(classic: Path, fused: Path) -> Path:
    """The same weights in transformers 5's fused expert layout."""
    fused.mkdir()
    tensors = load_file(classic / "model.safetensors")
    layouts = MIXTRAL_LAYOUTS["classic"], MIXTRAL_LAYOUTS["fused"]
    for layer in range(LAYERS):
        tensors[layouts[1].router_name(layer)] = tensors.pop(layouts[0].router_name(layer))
        prefix = f"model.layers.{layer}.block_sparse_moe.experts."
        parts = {
            part: [tensors.pop(f"{prefix}{expert}.{part}.weight") for expert in range(EXPERTS)]
            for part in ("w1", "w2", "w3")
        }
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w1, w3]) for w1, w3 in zip(parts["w1"], parts["w3"], strict=True)]
        )
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(parts["w2"])
    save_file(tensors, fused / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(classic / name, fused / name)
    return fused


@pytest.fixture(scope="module")
def hand_routed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hand_routed_mixtral(tmp_path_factory.mktemp("hand") / "classic")


@pytest.fixture(scope="module")
def content_ids(hand_routed: Path) -> dict[str, list[int]]:
    """Each prompt's token ids without BOS, which route leaves out of every statistic."""
    tokenizer = AutoTokenizer.from_pretrained(str(hand_routed))
    return {text: tokenizer(text)["input_ids"][1:] for text in PROMPTS}


def route_json(*args: str | Path) -> dict:
    result = run_cli("route", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_hand_set_gate_rows_were_saved_by_transformers_in_the_classic_layout(hand_routed: Path) -> None:
    names = load_file(hand_routed / "model.safetensors").keys()
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


def test_route_reports_the_constructed_top1_expert_for_every_token_and_layer(
    hand_routed: Path, content_ids: dict[str, list[int]]
) -> None:
    report = route_json(hand_routed, *(arg for text in PROMPTS for arg in ("--prompt", text)))

    assert [prompt["text"] for prompt in report["prompts"]] == list(PROMPTS)
    for prompt in report["prompts"]:
        ids = content_ids[prompt["text"]]
        assert prompt["top_expert"] == [[expected_top_expert(t, layer) for t in ids] for layer in range(LAYERS)]
        assert len(prompt["tokens"]) == len(ids)


def test_route_utilisation_and_entropy_follow_from_the_construction(
    hand_routed: Path, content_ids: dict[str, list[int]]
) -> None:
    report = route_json(hand_routed, *(arg for text in PROMPTS for arg in ("--prompt", text)))

    all_ids = [t for text in PROMPTS for t in content_ids[text]]
    for layer in range(LAYERS):
        counts = [sum(expected_top_expert(t, layer) == e for t in all_ids) for e in range(EXPERTS)]
        assert report["utilisation"]["by_layer"][layer] == pytest.approx([c / len(all_ids) for c in counts])
    winner = winner_probability()
    loser = (1 - winner) / (EXPERTS - 1)
    entropy = -(winner * math.log(winner) + (EXPERTS - 1) * loser * math.log(loser))
    assert report["mean_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert report["max_entropy"] == pytest.approx(math.log(EXPERTS))


def test_streamed_router_probabilities_equal_transformers_own_router_logits(hand_routed: Path) -> None:
    from frankenmoe.analysis.routing import route_prompts
    from frankenmoe.checkpoint.folder import load_checkpoint

    routing = route_prompts(load_checkpoint(hand_routed), [PROMPTS[1]])[0]
    model = MixtralForCausalLM.from_pretrained(hand_routed)
    with torch.no_grad():
        output = model(routing.prompt.token_ids.unsqueeze(0), output_router_logits=True)
    expected = torch.stack([torch.softmax(logits.float(), dim=-1) for logits in output.router_logits])
    torch.testing.assert_close(routing.probabilities, expected, atol=1e-5, rtol=1e-5)


def test_labels_give_exact_prompt_and_token_accuracy(
    hand_routed: Path, content_ids: dict[str, list[int]], tmp_path: Path
) -> None:
    def wins(ids: list[int]) -> list[int]:
        return [sum(expected_top_expert(t, layer) == e for t in ids for layer in range(LAYERS)) for e in range(EXPERTS)]

    preferred = {}
    for text in PROMPTS:
        counts = wins(content_ids[text])
        assert counts.count(max(counts)) == 1, f"the construction must give {text!r} a unique favourite"
        preferred[text] = counts.index(max(counts))
    # Two prompts labelled with their true favourite, one deliberately with another expert.
    wrong = (preferred[PROMPTS[2]] + 1) % EXPERTS
    labels = {preferred[PROMPTS[0]]: [PROMPTS[0]], preferred[PROMPTS[1]]: [PROMPTS[1]]}
    labels.setdefault(wrong, []).append(PROMPTS[2])
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(yaml.safe_dump(labels))
    label_of = {text: expert for expert, texts in labels.items() for text in texts}

    accuracy = route_json(hand_routed, "--labels", labels_file)["accuracy"]

    assert accuracy["prompt_accuracy"] == pytest.approx(2 / 3)
    for layer in range(LAYERS):
        hits = [expected_top_expert(t, layer) == label_of[text] for text in PROMPTS for t in content_ids[text]]
        assert accuracy["token_accuracy_by_layer"][layer] == pytest.approx(sum(hits) / len(hits))
    assert {item["text"]: item["preferred_expert"] for item in accuracy["prompts"]} == preferred


def test_classic_and_fused_layouts_route_identically(hand_routed: Path, tmp_path: Path) -> None:
    fused = convert_to_fused(hand_routed, tmp_path / "fused")
    arguments = [arg for text in PROMPTS for arg in ("--prompt", text)]

    classic_report = route_json(hand_routed, *arguments)
    fused_report = route_json(fused, *arguments)

    assert classic_report.pop("checkpoint") != fused_report.pop("checkpoint")
    assert classic_report == fused_report


def test_text_output_shows_grid_shares_utilisation_and_accuracy(hand_routed: Path, tmp_path: Path) -> None:
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(yaml.safe_dump({0: [PROMPTS[0]]}))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")

    result = run_cli("route", hand_routed, "--prompts-file", prompts_file, "--labels", labels_file)

    assert result.exit_code == 0, result.output
    assert f"prompt 3/3: {PROMPTS[0]!r}" in result.output
    assert "top-1 expert per token and layer:" in result.output
    assert "share of tokens per expert and layer (%):" in result.output
    assert "expert utilisation over all 3 prompt(s)" in result.output
    assert f"{math.log(EXPERTS):.3f} = uniform over all {EXPERTS}" in result.output
    assert "routing accuracy on 1 labelled prompt(s):" in result.output


def test_route_writes_a_png_heatmap(hand_routed: Path, tmp_path: Path) -> None:
    picture = tmp_path / "routing.png"

    result = run_cli("route", hand_routed, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--png", picture)

    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(picture).shape[:2]
    assert width >= 600 and height >= 400


def test_png_without_matplotlib_fails_with_the_install_hint(
    hand_routed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    result = run_cli("route", hand_routed, "--prompt", PROMPTS[0], "--png", tmp_path / "routing.png")

    assert result.exit_code == 1
    assert "pip install 'frankenmoe[plot]'" in result.output
    assert not (tmp_path / "routing.png").exists()


def test_route_without_prompts_says_how_to_give_them(hand_routed: Path) -> None:
    result = run_cli("route", hand_routed)

    assert result.exit_code == ConfigError.exit_code
    assert "--prompt TEXT" in result.output


def test_label_names_need_a_model_card(hand_routed: Path, tmp_path: Path) -> None:
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(yaml.safe_dump({"code": [PROMPTS[0]]}))

    result = run_cli("route", hand_routed, "--labels", labels_file)

    assert result.exit_code == ConfigError.exit_code
    assert "no frankenmoe model card" in result.output


def test_expert_names_match_a_whole_source_model_or_its_last_component() -> None:
    sources = ("./models/code-expert", "org/story-expert@main", "/abs/math")

    assert resolve_expert("code-expert", 3, sources, "labels") == 0
    assert resolve_expert("org/story-expert@main", 3, sources, "labels") == 1
    assert resolve_expert("story-expert", 3, sources, "labels") == 1
    assert resolve_expert(2, 3, sources, "labels") == 2
    with pytest.raises(ConfigError, match="matches no expert"):
        resolve_expert("poetry", 3, sources, "labels")
    with pytest.raises(ConfigError, match="matches several experts"):
        resolve_expert("same", 2, ("a/same", "b/same"), "labels")
    with pytest.raises(ConfigError, match="experts 0 to 2"):
        resolve_expert(3, 3, sources, "labels")


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A merge of the tiny models with the default routing check, and what the merge printed."""
    root = tmp_path_factory.mktemp("merged")
    config = write_config(root / "config.yaml", tiny_models.base, tiny_models.experts)
    result = run_cli("merge", config, root / "out")
    assert result.exit_code == 0, result.output
    return root / "out", result.output


def test_merge_prints_and_records_a_routing_check_that_route_reproduces(
    merged: tuple[Path, str], tmp_path: Path
) -> None:
    out, printed = merged
    card = (out / "README.md").read_text()
    assert "## Routing check" in card
    assert card.index("## Routing check") < card.index("## Merge recipe")
    check_line = next(line for line in printed.splitlines() if line.startswith("routing check:"))

    # The same positive prompts, labelled by expert folder name, through `route`.
    config = yaml.safe_load((out / "README.md").read_text().split("```yaml\n")[1].split("```")[0])
    labels = {Path(expert["source_model"]).name: expert["positive_prompts"] for expert in config["experts"]}
    labels_file = tmp_path / "labels.yaml"
    labels_file.write_text(yaml.safe_dump(labels))
    accuracy = route_json(out, "--labels", labels_file)["accuracy"]

    prompt_count = sum(len(prompts) for prompts in labels.values())
    hits = round(accuracy["prompt_accuracy"] * prompt_count)
    assert check_line.startswith(f"routing check: {hits}/{prompt_count} positive prompts")
    assert f"{accuracy['token_accuracy']:.0%} of tokens" in check_line
    assert f"Overall: {hits}/{prompt_count} prompts" in card


def test_merge_no_check_skips_the_routing_check(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_models.base, tiny_models.experts[:2])

    result = run_cli("merge", config, tmp_path / "out", "--no-check")

    assert result.exit_code == 0, result.output
    assert "routing check" not in result.output
    assert "## Routing check" not in (tmp_path / "out" / "README.md").read_text()


def test_merge_without_prompts_notes_that_the_check_was_skipped(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml", tiny_models.base, tiny_models.experts[:2], prompts=[[]], gate_mode="random"
    )

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "routing check skipped: no expert has positive prompts to route." in result.output
    assert "## Routing check" not in (tmp_path / "out" / "README.md").read_text()


# --- prompts and tokenizers that cannot route ----------------------------------------------------------------------


def test_a_checkpoint_without_tokenizer_files_says_so(hand_routed: Path, tmp_path: Path) -> None:
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(hand_routed, bare)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (bare / name).unlink()

    result = run_cli("route", bare, "--prompt", "hello")

    assert result.exit_code == ModelError.exit_code
    assert f"{bare.resolve()} has no tokenizer files" in result.output
    assert "tokenizer.json, tokenizer.model or vocab.json" in result.output
    assert "sentencepiece" not in result.output and "tiktoken" not in result.output


@pytest.mark.parametrize("empty", ["", "   \n\t"])
def test_an_empty_prompt_is_refused(hand_routed: Path, empty: str) -> None:
    result = run_cli("route", hand_routed, "--prompt", PROMPTS[0], "--prompt", empty)

    assert result.exit_code == ConfigError.exit_code
    assert "Prompt 2 of 2 is empty" in result.output


def test_a_prompt_of_special_tokens_only_routes_with_a_warning(hand_routed: Path) -> None:
    result = run_cli("route", hand_routed, "--prompt", "<s></s>", "--json")

    assert result.exit_code == 0, result.output
    assert "Prompt '<s></s>' is made only of special tokens (<s>, </s>)" in result.stderr


def test_a_long_prompt_is_truncated_with_one_warning(hand_routed: Path) -> None:
    # A text of its own: the warning is given once per prompt per process.
    long_prompt = "route this long prompt please " * 200

    result = run_cli("route", hand_routed, "--prompt", long_prompt, "--json")

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: ")]
    assert len(warnings) == 1
    assert "more than the model's context of 512; it was truncated to the first 512 tokens" in warnings[0]


def test_a_merge_warns_once_per_long_or_special_only_prompt(tiny_models: TinyModels, tmp_path: Path) -> None:
    # The routers tokenise the prompts and the routing check tokenises them again; each says so once.
    long_prompt = "merge this long prompt please " * 200
    prompts = [[long_prompt, "<s>"], [long_prompt, "once upon a time"]]
    config = write_config(tmp_path / "config.yaml", tiny_models.base, tiny_models.experts[:2], prompts=prompts)

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: ")]
    assert sum("it was truncated to the first 512 tokens" in line for line in warnings) == 1
    assert sum("Prompt '<s>' is made only of special tokens (<s>)" in line for line in warnings) == 1
