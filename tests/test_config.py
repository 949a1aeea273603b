"""Config parsing: defaults, every key, the mergekit-moe schema, and the basic validation rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from frankenmoe.config.parse import load_config, parse_config
from frankenmoe.config.schema import ExpertConfig, MergeConfig, RouterConfig
from frankenmoe.errors import ConfigError

MINIMAL = """
base_model: org/base
experts:
  - source_model: org/coder
    positive_prompts: ["write code"]
  - source_model: ./local/storyteller
    positive_prompts: ["tell a story"]
"""


def parse(text: str) -> MergeConfig:
    return parse_config(textwrap.dedent(text), "test.yaml")


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.exit_code == 2
    return caught.value.message


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse(MINIMAL)

    assert config.base_model == "org/base"
    assert [expert.source_model for expert in config.experts] == ["org/coder", "./local/storyteller"]
    assert config.gate_mode == "fit" and config.gate_mode_defaulted  # the default since issue 28
    assert config.dtype is None
    assert config.experts_per_token == 2
    assert config.architecture == "auto"
    assert config.router == RouterConfig(
        pooling="mean",
        scale=None,
        sequential=False,
        ridge_lambda=0.1,
        input="router",
        logit_std=1.0,
        continuation_tokens=32,  # fit's own default
    )
    assert (config.router.center, config.router.lead_in) == (True, True)
    assert config.experts[0] == ExpertConfig(source_model="org/coder", positive_prompts=("write code",))
    assert config.experts[0].negative_prompts == ()
    assert config.experts[0].noise_scale is None
    assert config.experts[0].residual_scale is None
    assert config.needs_prompts


def test_every_key_is_read() -> None:
    config = parse(
        """
        base_model: org/base@v1.0
        gate_mode: cheap_embed
        dtype: bfloat16
        experts_per_token: 1
        architecture: mixtral
        router:
          pooling: last
          scale: 4.5
          sequential: true
          ridge_lambda: 0.25
          input: residual
          logit_std: 2.0
        experts:
          - source_model: org/coder
            positive_prompts: ["write code", "fix this bug"]
            negative_prompts: ["tell a story"]
            noise_scale: 0.01
            residual_scale: 0.5
          - source_model: /abs/storyteller
            positive_prompts: ["once upon a time"]
            noise_scale: 0
            residual_scale: -1
        """
    )

    assert config == MergeConfig(
        base_model="org/base@v1.0",
        experts=(
            ExpertConfig(
                source_model="org/coder",
                positive_prompts=("write code", "fix this bug"),
                negative_prompts=("tell a story",),
                noise_scale=0.01,
                residual_scale=0.5,
            ),
            ExpertConfig(
                source_model="/abs/storyteller",
                positive_prompts=("once upon a time",),
                noise_scale=0.0,
                residual_scale=-1.0,
            ),
        ),
        gate_mode="cheap_embed",
        dtype="bfloat16",
        experts_per_token=1,
        architecture="mixtral",
        router=RouterConfig(
            pooling="last", scale=4.5, sequential=True, ridge_lambda=0.25, input="residual", logit_std=2.0
        ),
    )


def test_router_scale_auto_means_calibrated() -> None:
    assert parse(MINIMAL + "router:\n  scale: auto\n").router.scale is None


def test_mergekit_moe_config_parses_unchanged() -> None:
    """A config in mergekit-moe's own style: quoted prompts, float16, explicit nulls, comments."""
    config = parse(
        """
        # mergekit-moe style
        base_model: mistralai/Mistral-7B-Instruct-v0.2
        gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
        dtype: float16
        experts_per_token: 2
        experts:
          - source_model: teknium/OpenHermes-2.5-Mistral-7B
            positive_prompts:
              - "chat"
              - "assistant"
            negative_prompts:
              - "code"
            noise_scale: null
            residual_scale: null
          - source_model: WizardLM/WizardMath-7B-V1.1
            positive_prompts:
              - "math"
        """
    )

    assert config.dtype == "float16"
    assert config.experts[0].negative_prompts == ("code",)
    assert config.experts[0].noise_scale is None
    assert config.experts[1].positive_prompts == ("math",)


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random", "uniform_random"])
def test_every_supported_gate_mode_is_accepted(gate_mode: str) -> None:
    assert parse(MINIMAL + f"gate_mode: {gate_mode}\n").gate_mode == gate_mode


@pytest.mark.parametrize("gate_mode", ["random", "uniform_random"])
def test_gate_modes_without_prompts_accept_experts_without_prompts(gate_mode: str) -> None:
    config = parse(
        f"""
        base_model: org/base
        gate_mode: {gate_mode}
        experts:
          - source_model: org/a
          - source_model: org/b
        """
    )

    assert not config.needs_prompts
    assert all(expert.positive_prompts == () for expert in config.experts)


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_prompt_gate_modes_name_the_expert_without_prompts(gate_mode: str) -> None:
    message = config_error(
        f"""
        base_model: org/base
        gate_mode: {gate_mode}
        experts:
          - source_model: org/a
            positive_prompts: ["a"]
          - source_model: org/b
        """
    )

    assert "experts[1]" in message
    assert "org/b" in message
    assert "positive_prompts" in message
    assert gate_mode in message


def test_misspelled_expert_key_names_its_path_and_suggests_the_right_key() -> None:
    message = config_error(
        """
        base_model: org/base
        experts:
          - source_model: org/a
            positive_prompts: ["a"]
          - source_model: org/b
            positive_prompts: ["b"]
          - source_model: org/c
            positve_prompts: ["c"]
        """
    )

    assert "`experts[2].positve_prompts`" in message
    assert "Did you mean `positive_prompts`?" in message
    assert message.startswith("test.yaml:")


def test_misspelled_top_level_and_router_keys_suggest_the_right_key() -> None:
    assert "Did you mean `experts_per_token`?" in config_error(MINIMAL + "experts_per_tok: 1\n")
    assert "`router.poolng`" in config_error(MINIMAL + "router:\n  poolng: last\n")


@pytest.mark.parametrize("count", [0, 3, -1])
def test_experts_per_token_must_be_between_one_and_the_expert_count(count: int) -> None:
    message = config_error(MINIMAL + f"experts_per_token: {count}\n")

    assert f"`experts_per_token` is {count}" in message
    assert "between 1 and 2" in message


@pytest.mark.parametrize("count", [1, 2])
def test_experts_per_token_accepts_the_whole_range(count: int) -> None:
    assert parse(MINIMAL + f"experts_per_token: {count}\n").experts_per_token == count


def test_unsupported_architecture_is_refused_with_the_supported_list() -> None:
    message = config_error(MINIMAL + "architecture: qwen\n")

    assert "`architecture` is 'qwen'; it must be one of: auto, mixtral, qwen2_moe, qwen3_moe" in message


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("gate_mode: learned", "`gate_mode` is 'learned'"),
        ("dtype: float64", "`dtype` is 'float64'"),
        ("router:\n  pooling: max", "`router.pooling` is 'max'"),
        ("router:\n  scale: 0", "`router.scale` is 0.0"),
        ("router:\n  ridge_lambda: 0", "`router.ridge_lambda` must be greater than 0"),
        ("experts_per_token: two", "`experts_per_token` must be a whole number"),
    ],
)
def test_out_of_range_values_are_named_by_their_path(line: str, fragment: str) -> None:
    assert fragment in config_error(MINIMAL + line + "\n")


def test_required_keys_are_named_when_missing() -> None:
    assert "`base_model` is required" in config_error("experts:\n  - source_model: org/a\n    positive_prompts: [a]\n")
    assert "`experts[0].source_model` is required" in config_error(
        "base_model: org/base\nexperts:\n  - positive_prompts: [a]\n"
    )


def test_load_config_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(MINIMAL))
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(MINIMAL) + "gate_mod: random\n")

    assert load_config(good).base_model == "org/base"
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key `gate_mod`\. Did you mean `gate_mode`\?"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("base_model: org/old" + MINIMAL, "base_model", (1, 2)),
        (MINIMAL + "gate_mode: hidden\nrouter: {}\ngate_mode: random\n", "gate_mode", (8, 10)),
        (
            MINIMAL + "  - source_model: org/c\n    positive_prompts: [code]\n    positive_prompts: [maths]\n",
            "positive_prompts",
            (9, 10),
        ),
        (MINIMAL + "router:\n  pooling: mean\n  pooling: last\n", "pooling", (9, 10)),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(text: str, key: str, lines: tuple[int, int]) -> None:
    message = config_error(text)

    assert f"`{key}` is given twice" in message
    assert f"lines {lines[0]} and {lines[1]}" in message


def test_merge_keys_may_be_overridden_without_counting_as_duplicates() -> None:
    # `<<: *defaults` then an explicit key is YAML's way to override a default, not a repeated key.
    config = parse(
        """
        base_model: org/base
        experts:
          - &coder
            source_model: org/coder
            positive_prompts: ["write code"]
          - <<: *coder
            source_model: org/coder-2
        """
    )

    assert [expert.source_model for expert in config.experts] == ["org/coder", "org/coder-2"]
    assert config.experts[1].positive_prompts == ("write code",)
