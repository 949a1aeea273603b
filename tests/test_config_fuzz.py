"""Property: whatever text reaches the config loader, it returns a MergeConfig or raises ConfigError, nothing else.

Inputs are random text, YAML-flavoured noise, and mutations of a valid Beyonder-style config (keys
dropped or renamed, values swapped for other types, the YAML text cut and spliced). Hypothesis runs
derandomized with a fixed example budget, so the suite sees the same few hundred inputs every time.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from frankenmoe.config import constants as config_constants
from frankenmoe.config import schema as config_module
from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import MergeConfig
from frankenmoe.errors import ConfigError

SEED_TEXT = """\
base_model: example-org/base-7b-slerp
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: example-org/chat-7b
    positive_prompts:
      - "chat"
      - "explain"
  - source_model: example-org/code-7b
    positive_prompts:
      - "python"
      - "algorithm"
    negative_prompts:
      - "poem"
  - source_model: example-org/story-7b
    positive_prompts:
      - "write a scene"
      - "character"
    noise_scale: 0.01
  - source_model: example-org/math-7b
    positive_prompts:
      - "solve"
      - "count"
    residual_scale: 0.5
router:
  pooling: mean
"""
SEED = yaml.safe_load(SEED_TEXT)
KNOWN_KEYS = sorted(
    {
        key
        for module in (config_constants, config_module)
        for name, keys in vars(module).items()
        if name.endswith("_KEYS")
        for key in keys
    }
    | {"experts_per_tokens", "postive_prompts", "source", "gate"}
)
FUZZ_SETTINGS = settings(
    derandomize=True, max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["hidden", "random", "bfloat16", "mixtral", "mean", "all", "snr", "0-3", "mlp"])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


def assert_loader_contract(text: str) -> None:
    try:
        result = parse_config(text, "fuzz.yaml")
    except ConfigError as error:
        assert error.message.strip()
        assert "\n\n" not in error.message
        # A message quotes the input at most a bounded amount: YAML aliases must not blow it up.
        assert len(error.message) <= 2 * len(text) + 1500
    else:
        assert isinstance(result, MergeConfig)


def locations(data: Any) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) pair in a nested structure of dicts and lists."""
    found: list[tuple[Any, Any]] = []
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, child in children:
        found.append((data, key))
        found.extend(locations(child))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    data = copy.deepcopy(SEED)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        places = locations(data)
        if not places:
            break
        container, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["drop", "rename", "replace"]))
        if action == "drop":
            del container[key]
        elif action == "rename" and isinstance(container, dict):
            container[draw(keys)] = container.pop(key)
        else:
            container[key] = draw(values)
    return yaml.safe_dump(data, sort_keys=False)


@st.composite
def spliced_texts(draw: st.DrawFn) -> str:
    start = draw(st.integers(min_value=0, max_value=len(SEED_TEXT)))
    end = draw(st.integers(min_value=start, max_value=min(len(SEED_TEXT), start + 40)))
    insert = draw(st.text(alphabet=":-[]{},'\"#&*!|>%@`?\n \t0123456789.abcdefeghijklmnopqrstuvwxyz", max_size=20))
    return SEED_TEXT[:start] + insert + SEED_TEXT[end:]


def test_the_seed_config_is_valid() -> None:
    config = parse_config(SEED_TEXT)
    assert len(config.experts) == 4
    assert config.experts[1].negative_prompts == ("poem",)


@FUZZ_SETTINGS
@given(mutated_configs())
def test_mutated_configs_load_or_raise_config_error(text: str) -> None:
    assert_loader_contract(text)


@FUZZ_SETTINGS
@given(spliced_texts())
def test_spliced_yaml_text_loads_or_raises_config_error(text: str) -> None:
    assert_loader_contract(text)


@FUZZ_SETTINGS
@given(st.text(max_size=200) | st.text(alphabet=":-[]{},'\"#&*!|>%@`?\n \tab01.", max_size=200))
@example("base_model: 2024-13-45\nexperts: []")
@example("experts_per_token: !!int 0x\n")
@example("base_model: !!float abc\n")
@example("[" * 3000 + "]" * 3000)
@example("a: 1\nb: \x00")
@example("&loop [*loop]")
@example("base_model: x\nexperts:\n  - source_model: y\n    laser: {method: snr, matrices: [[mlp]]}\n")
@example('base_model: x\nexperts:\n  - source_model: y\n    laser: {method: snr, layers: "0-99999999999999"}\n')
@example("base_model: !!python/object/apply:os.system ['touch /tmp/pwned']\n")
def test_random_text_loads_or_raises_config_error(text: str) -> None:
    assert_loader_contract(text)


def test_yaml_alias_bomb_gives_a_short_message() -> None:
    # Nine levels of nine-fold aliases: a full repr of base_model would be 9**9 strings long.
    levels = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 9)]
    text = f"base_model: [{', '.join(levels)}]\nexperts: []\n"
    with pytest.raises(ConfigError, match="`base_model` must be a non-empty string, not list") as raised:
        parse_config(text)
    assert len(raised.value.message) < 1000


def test_invalid_date_is_reported_at_its_line_and_column() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config("base_model: x\nexperts:\n  - source_model: 2024-13-45\n", "dates.yaml")
    assert "dates.yaml is not valid YAML: cannot read the value '2024-13-45'" in raised.value.message
    assert "line 3, column 19" in raised.value.message
