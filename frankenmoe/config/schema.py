"""The merge config's one schema: frozen dataclasses whose field metadata says each YAML key's type, default and doc.

The schema is mergekit-moe's, so configs written for it run unchanged; frankenmoe's own additions
(the `router` block) are optional. frankenmoe.config.parse reads YAML into these dataclasses, and
frankenmoe.config.json_schema turns the same metadata into the shipped JSON Schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from frankenmoe.architectures.tables import ARCHITECTURE_NAMES
from frankenmoe.config.constants import (
    AUTO_CONTINUATION_TOKENS,
    DEFAULT_GATE_MODE,
    DTYPES,
    GATE_MODES,
    LASER_LAYER_WORDS,
    LASER_METHODS,
    MAX_CONTINUATION_TOKENS,
    POOLINGS,
    PROMPT_GATE_MODES,
    ROUTER_INPUTS,
    TRUNK_METHODS,
)

_NO_DEFAULT: Any = object()
"""A YamlKey's default when the key is required."""


@dataclass(frozen=True)
class YamlKey:
    """What one YAML key is, kept in its dataclass field's metadata (`yaml_key`). The parser derives its allowed
    keys from these, and frankenmoe.config.json_schema turns them into the shipped JSON Schema."""

    doc: str
    schema: Mapping[str, Any]
    """The JSON Schema of the value (type, allowed values, range); the generator adds doc and default."""
    default: Any = _NO_DEFAULT
    """What leaving the key out means, as YAML data (`auto`, `[]`); _NO_DEFAULT when the key is required."""
    name: str = ""
    """The key's YAML spelling where it is not the field's name (mergekit's `lambda` for `scale`)."""

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


def yaml_key(
    doc: str,
    schema: Mapping[str, Any],
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    yaml_default: Any = MISSING,
    name: str = "",
) -> Any:
    """A dataclass field that is a YAML key. `yaml_default` is what the config writes for the default where that
    differs from the Python default (`auto` for None); otherwise the Python default is it, tuples as lists."""
    if yaml_default is MISSING:
        yaml_default = _NO_DEFAULT if default is MISSING else _as_yaml(default)
    metadata = {"yaml": YamlKey(doc, schema, yaml_default, name)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _as_yaml(value: Any) -> Any:
    return [_as_yaml(item) for item in value] if isinstance(value, tuple) else value


def yaml_fields(config_class: type) -> tuple[tuple[str, YamlKey], ...]:
    """A config dataclass's YAML keys in field order, by their YAML names (fields without metadata are not keys)."""
    return tuple(
        (item.metadata["yaml"].name or item.name, item.metadata["yaml"])
        for item in fields(config_class)
        if "yaml" in item.metadata
    )


def yaml_keys(config_class: type, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(name for name, _ in yaml_fields(config_class) if name not in without)


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A key the parser also accepts as `null`, which means the same as leaving it out."""
    return {"anyOf": [dict(schema), {"type": "null"}]}


_TEXT = {"type": "string", "pattern": r"\S"}  # what config.values.as_string accepts: not empty, not only spaces
_NUMBER = {"type": "number"}
_BOOLEAN = {"type": "boolean"}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_PROMPTS = _nullable({"type": "array", "items": _TEXT})
_LAYER_RANGE = r"^\s*[0-9]+\s*-\s*[0-9]+\s*$"  # "20-31", as config.parse splits it


@dataclass(frozen=True)
class LaserConfig:
    """Rank reduction of selected weight matrices (see docs/laser.md).

    Parsed, `matrices` are exact names (groups expanded), and `layers` is "all", "last_half" or explicit layer
    indices, checked against the model in planning.
    """

    method: str = yaml_key("How the kept rank is chosen (required).", {"enum": list(LASER_METHODS)})
    matrices: tuple[str, ...] = yaml_key(
        "Matrix groups or exact matrix names to reduce; default: mlp in an expert's block, attention in base_laser.",
        _nullable({"anyOf": [_TEXT, {"type": "array", "items": _TEXT}]}),
        yaml_default=None,
    )
    layers: str | tuple[int, ...] = yaml_key(
        'The layers to reduce: all, last_half, a range such as "20-31" (both ends included) or layer indices.',
        {
            "anyOf": [
                {"enum": list(LASER_LAYER_WORDS)},
                {"type": "string", "pattern": _LAYER_RANGE},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        },
        default="all",
    )
    top_k: int | None = yaml_key(
        "snr only: reduce at most this many of the lowest-SNR matrices (default: all).",
        _nullable({"type": "integer", "minimum": 1}),
        default=None,
    )
    keep_fraction: float | None = yaml_key(
        "fixed only, and required there: the fraction of each matrix's rank kept, e.g. 0.05.",
        _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        default=None,
    )
    calibration: str | None = yaml_key(
        "A text file: keep a reduction only if it does not raise perplexity on it.", _nullable(_TEXT), default=None
    )


@dataclass(frozen=True)
class ExpertConfig:
    """One expert: the fine-tune whose MLPs it is, and the prompts its router row is built from.

    A shared expert takes a subset of the keys (SHARED_EXPERT_KEYS).
    """

    source_model: str = yaml_key("The fine-tune whose MLPs become this expert: a folder or org/name[@revision].", _TEXT)
    positive_prompts: tuple[str, ...] = yaml_key(
        "Text describing what this expert is good at; the router rows are built from it.", _PROMPTS, default=()
    )
    negative_prompts: tuple[str, ...] = yaml_key(
        "Text this expert should not get; its pooled vector is subtracted.", _PROMPTS, default=()
    )
    noise_scale: float | None = yaml_key(
        "Standard deviation of seeded Gaussian noise added to this expert's MLP tensors.",
        _nullable({"type": "number", "minimum": 0}),
        default=None,
    )
    residual_scale: float | None = yaml_key(
        "Multiplies this expert's down_proj (w2), scaling what it writes into the residual stream.",
        _nullable(_NUMBER),
        default=None,
    )
    laser: LaserConfig | None = yaml_key(
        "Rank reduction of this expert's MLP matrices (docs/laser.md).",
        _nullable({"$ref": "#/$defs/expert_laser"}),
        default=None,
    )


@dataclass(frozen=True)
class RouterConfig:
    """How prompt hidden states become gate rows (frankenmoe's own options; see docs/gate-modes.md)."""

    pooling: str = yaml_key(
        "hidden/cheap_embed: one vector per prompt is the mean of its content tokens, or its last one.",
        {"enum": list(POOLINGS)},
        default="mean",
    )
    scale: float | None = yaml_key(
        "auto: per layer, rows are scaled so the prompts' router logits spread by logit_std; a number multiplies them.",
        _nullable({"anyOf": [{"const": "auto"}, _POSITIVE]}),
        default=None,
        yaml_default="auto",
    )
    """None is the config's `auto`."""
    sequential: bool = yaml_key(
        "hidden/fit: compute each layer's states in the merged model itself instead of the base.",
        _BOOLEAN,
        default=False,
    )
    ridge_lambda: float = yaml_key("fit: the relative ridge strength.", _POSITIVE, default=0.1)
    input: str = yaml_key(
        "The states rows are built from: the router input (router) or the residual stream entering the layer.",
        {"enum": list(ROUTER_INPUTS)},
        default="router",
    )
    """router: post_attention_layernorm output (what Mixtral routes on); residual: the stream entering the layer."""
    logit_std: float = yaml_key(
        "The router logit spread that scale: auto aims at; larger routes more decisively.", _POSITIVE, default=1.0
    )
    center: bool = yaml_key(
        "hidden/fit: rows lose their component along the mean prompt token.", _BOOLEAN, default=True
    )
    """hidden/fit: rows carry no component along the mean prompt token, so a direction every token shares
    (massive activations) adds the same logit to every expert instead of favouring one."""
    lead_in: bool = yaml_key(
        "hidden/fit: prompts whose tokenizer adds no start token run behind a newline left out of the rows.",
        _BOOLEAN,
        default=True,
    )
    """Prompts whose tokenizer adds no start token get one neutral token in front (left out of the rows),
    so their own first token is not the model's attention sink."""
    continuation_tokens: int = yaml_key(
        "hidden/fit: the base model continues each prompt by up to this many tokens before the rows are built; auto: "
        + "".join(f"{tokens} for {mode}, " for mode, tokens in AUTO_CONTINUATION_TOKENS.items())
        + "else 0.",
        _nullable(
            {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 0, "maximum": MAX_CONTINUATION_TOKENS}]}
        ),
        default=0,
        yaml_default="auto",
    )
    """hidden/fit: the base model first writes up to this many tokens after each prompt (greedy), and the
    rows are built from the prompt and what it wrote. A config's `auto` is AUTO_CONTINUATION_TOKENS."""


@dataclass(frozen=True)
class SharedWeightsConfig:
    """How the non-expert tensors are made (frankenmoe.sources.trunk): from the base alone, or merged with the experts."""

    method: str = yaml_key(
        "base: the base's tensors; otherwise mergekit's merge of the base and the routed experts.",
        {"enum": list(TRUNK_METHODS)},
        default="base",
    )
    weights: tuple[float, ...] | None = yaml_key(
        "One weight per routed expert, in expert order (default 1.0 each).",
        _nullable({"type": "array", "items": _NUMBER}),
        default=None,
    )
    base_weight: float = yaml_key("linear only: the base model's weight.", _NUMBER, default=1.0)
    density: float = yaml_key(
        "dare_*: the fraction of each delta kept.", {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, default=0.5
    )
    scale: float = yaml_key(
        "task_arithmetic and dare_*: the scale of the merged delta.", _NUMBER, default=1.0, name="lambda"
    )
    normalize: bool = yaml_key(
        "linear: divide by the weights' sum; dare_ties: by the agreeing deltas' weights.", _BOOLEAN, default=True
    )


@dataclass(frozen=True)
class MergeConfig:
    """The whole merge config (mergekit-moe's schema plus frankenmoe's `router` and laser blocks)."""

    base_model: str = yaml_key(
        "The model that provides the embeddings, attention, norms, lm_head, tokenizer and config.", _TEXT
    )
    experts: tuple[ExpertConfig, ...] = yaml_key(
        "One entry per expert, in output order.", {"type": "array", "items": {"$ref": "#/$defs/expert"}, "minItems": 1}
    )
    gate_mode: str = yaml_key(
        "How each layer's router (gate) weights are set.", {"enum": list(GATE_MODES)}, default=DEFAULT_GATE_MODE
    )
    dtype: str | None = yaml_key(
        "The dtype of every output tensor; null keeps the base model's.",
        _nullable({"enum": list(DTYPES)}),
        default=None,
    )
    experts_per_token: int = yaml_key(
        "How many experts each token is routed to, 1 to the number of experts.",
        {"type": "integer", "minimum": 1},
        default=2,
    )
    architecture: str = yaml_key(
        "The output format; auto picks the natural one for the sources.",
        {"enum": list(ARCHITECTURE_NAMES)},
        default="auto",
    )
    shared_experts: tuple[ExpertConfig, ...] = yaml_key(
        "mergekit's shared expert (qwen2_moe): an MLP every token goes through behind a sigmoid gate.",
        {"type": "array", "items": {"$ref": "#/$defs/shared_expert"}},
        default=(),
    )
    shared_weights: SharedWeightsConfig = yaml_key(
        "How the non-expert tensors are made: from the base alone, or merged from the base and the experts.",
        {"$ref": "#/$defs/shared_weights"},
        default_factory=SharedWeightsConfig,
        yaml_default={"method": "base"},
    )
    router: RouterConfig = yaml_key(
        "frankenmoe's router options (mergekit ignores them).",
        {"$ref": "#/$defs/router"},
        default_factory=RouterConfig,
        yaml_default={},
    )
    base_laser: LaserConfig | None = yaml_key(
        "Rank reduction of the base model's attention matrices (docs/laser.md).",
        _nullable({"$ref": "#/$defs/base_laser"}),
        default=None,
    )
    gate_mode_defaulted: bool = False
    """True when the config names no gate_mode and DEFAULT_GATE_MODE was taken (not a YAML key)."""

    @property
    def needs_prompts(self) -> bool:
        return self.gate_mode in PROMPT_GATE_MODES

    @property
    def gate_mode_description(self) -> str:
        """The gate mode that runs and why, as the dry run, the model card and the manifest say it."""
        if self.gate_mode_defaulted:
            return f"{self.gate_mode} (the default: the config names no gate_mode)"
        return self.gate_mode


# The allowed keys of each mapping, for "unknown key, did you mean": the dataclasses' YAML fields.
MERGE_KEYS = yaml_keys(MergeConfig)
EXPERT_KEYS = yaml_keys(ExpertConfig)
SHARED_WEIGHTS_KEYS = yaml_keys(SharedWeightsConfig)
SHARED_EXPERT_KEYS = yaml_keys(ExpertConfig, without=("noise_scale", "laser"))
"""mergekit-moe's keys for a shared expert: an expert's keys but noise_scale and laser."""
ROUTER_KEYS = yaml_keys(RouterConfig)
LASER_KEYS = yaml_keys(LaserConfig)
