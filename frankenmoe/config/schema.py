"""The merge configuration: YAML in, frozen dataclasses out, every mistake named by its path.

The schema is mergekit-moe's, so configs written for it run unchanged; frankenmoe's own additions
(the `router` block) are optional.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from frankenmoe.architectures.tables import ARCHITECTURE_NAMES, ATTENTION_PROJECTIONS, MLP_PARTS
from frankenmoe.errors import ConfigError

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "fit")
DEFAULT_GATE_MODE = "fit"
"""The gate mode of a config that names none. mergekit-moe's default is `hidden`, which a config that
names it still gets; `fit` routes held-out prompts far better (benchmarks/routing) and, with text
generation in bfloat16 where the CPU has bfloat16 units, costs at most about twice `hidden` at 7B
(benchmarks/README.md, issue 28)."""
PROMPT_GATE_MODES = frozenset({"hidden", "cheap_embed", "fit"})
CONTINUING_GATE_MODES = frozenset({"hidden", "fit"})
AUTO_CONTINUATION_TOKENS = {"fit": 32}
"""router.continuation_tokens when the config says `auto` or nothing: per gate mode, 0 when absent.
Chosen by benchmarks/routing (fit gains most with keyword prompts; hidden's mean rows get worse)."""
MAX_CONTINUATION_TOKENS = 1024
DTYPES = ("bfloat16", "float16", "float32")
TRUNK_METHODS = ("base", "linear", "task_arithmetic", "dare_linear", "dare_ties")
"""`shared_weights.method`: how the non-expert tensors are made (formulas in frankenmoe.sources.trunk)."""
TRUNK_METHOD_KEYS = {
    "base": (),
    "linear": ("weights", "base_weight", "normalize"),
    "task_arithmetic": ("weights", "lambda"),
    "dare_linear": ("weights", "lambda", "density"),
    "dare_ties": ("weights", "lambda", "density", "normalize"),
}
"""The `shared_weights` keys (besides `method`) that each method's formula reads; any other is refused."""
MAX_LINEAR_AMPLIFICATION = 100.0
"""linear with normalize divides every weight by their sum S: (|b| + Σ|wᵢ|) / |S| is how much a 1% change
of one weight changes the result, relative to the deltas. Above 100, a 1% change of a weight can change
the merged tensors by more than the deltas themselves: the result is set by the cancellation in S."""
POOLINGS = ("mean", "last")
ROUTER_INPUTS = ("router", "residual")
LASER_METHODS = ("snr", "fixed", "optimal")
LASER_LAYER_WORDS = ("all", "last_half")
MAX_LASER_RANGE = 10_000
EXPERT_LASER_MATRICES = {"mlp": MLP_PARTS}
BASE_LASER_MATRICES = {"attention": tuple(ATTENTION_PROJECTIONS)}

T = TypeVar("T")

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


_TEXT = {"type": "string", "pattern": r"\S"}  # what _string accepts: not empty, not only spaces
_NUMBER = {"type": "number"}
_BOOLEAN = {"type": "boolean"}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_PROMPTS = _nullable({"type": "array", "items": _TEXT})
_LAYER_RANGE = r"^\s*[0-9]+\s*-\s*[0-9]+\s*$"  # "20-31", as _laser_layers splits it


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


def load_config(path: Path) -> MergeConfig:
    """Read and validate a merge config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist. Check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Config file {path} cannot be read: {error}.") from None
    return parse_config(text, str(path))


def parse_config(text: str, source_name: str = "<config>") -> MergeConfig:
    """Parse YAML text into a validated MergeConfig; every failure is a ConfigError."""
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: data only, never Python objects
    except _DuplicateKeyError as error:
        raise ConfigError(
            f"{source_name}: the key {error.key_text} is given twice in the same mapping, {error.places}. YAML would "
            "silently keep only the second value; remove the one you did not mean."
        ) from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or (str(error).splitlines() or ["unreadable text"])[0]
        if isinstance(error, yaml.constructor.ConstructorError):
            fix = "Quote the value there if it is meant as text, and remove any `!!` tag."
        else:
            fix = "Fix the YAML syntax there (indentation, quotes, a missing ':')."
        raise ConfigError(
            f"{source_name} is not valid YAML: {problem} at {_yaml_error_place(error, text)}. {fix}"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{source_name} nests lists or mappings thousands of levels deep, which no merge config does. "
            "Check that the file is the config you meant."
        ) from None
    if data is None:
        raise ConfigError(f"{source_name} is empty. A config needs at least `base_model` and `experts`.")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source_name} must be a mapping of keys to values (`base_model: ...`, `experts: ...`), "
            f"not a {type(data).__name__}."
        )
    return _merge_config(data, source_name)


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice; `places` says where the two keys are, for the message."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key_text = f"`{key}`" if isinstance(key, str) else _bounded_repr(key)
        if first.line == second.line:  # a flow mapping such as {a: 1, a: 2}
            self.places = f"on line {first.line + 1} (columns {first.column + 1} and {second.column + 1})"
        else:
            self.places = f"on lines {first.line + 1} and {second.line + 1}"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a value YAML cannot build (a date such as 2024-13-45, `!!int 0x`)
    becomes a YAML error at that value's line and column instead of a bare ValueError, and a key given
    twice in one mapping is an error instead of the last value silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_unique_keys(node)
        return super().construct_mapping(node, deep)

    def _check_unique_keys(self, node: yaml.MappingNode) -> None:
        # Only the mapping's own keys count: a key written after `<<: *defaults` overrides the default
        # by YAML's merge rule, which is what such a config means.
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:
                continue  # an unhashable key: SafeLoader's own construct_mapping reports it

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as error:
            what = f"the value {_bounded_repr(node.value)}" if isinstance(node, yaml.ScalarNode) else "a value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what} ({error})", node.start_mark
            ) from None


def _yaml_error_place(error: yaml.YAMLError, text: str) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return f"line {line}, column {column}"
    return "an unknown place"


def _bounded_repr(value: Any) -> str:
    """repr() cut short: a config value can be huge or nested (YAML aliases), an error message must not be."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 4


def _merge_config(data: Mapping[str, Any], source: str) -> MergeConfig:
    _check_keys(data, MERGE_KEYS, "", source)
    _require(data, "base_model", "", source)
    _require(data, "experts", "", source)
    base_model = _string(data["base_model"], "base_model", source)
    raw_experts = _sequence(data["experts"], "experts", source)
    if not raw_experts:
        raise ConfigError(f"{source}: `experts` is empty. List at least one expert with a `source_model`.")
    experts = tuple(_expert(item, f"experts[{index}]", source) for index, item in enumerate(raw_experts))

    gate_mode = _choice(data.get("gate_mode", DEFAULT_GATE_MODE), GATE_MODES, "gate_mode", source)
    dtype = None if data.get("dtype") is None else _choice(data["dtype"], DTYPES, "dtype", source)
    experts_per_token = _integer(data.get("experts_per_token", 2), "experts_per_token", source)
    if not 1 <= experts_per_token <= len(experts):
        raise ConfigError(
            f"{source}: `experts_per_token` is {experts_per_token}, but with {len(experts)} expert(s) "
            f"it must be between 1 and {len(experts)}."
        )
    architecture = _choice(data.get("architecture", "auto"), ARCHITECTURE_NAMES, "architecture", source)
    shared_experts = tuple(
        _expert(item, f"shared_experts[{index}]", source, SHARED_EXPERT_KEYS)
        for index, item in enumerate(_sequence(data.get("shared_experts", []), "shared_experts", source))
    )
    router = _router(data.get("router", {}), "router", gate_mode, source)
    base_laser = _optional_laser(data.get("base_laser"), BASE_LASER_MATRICES, "base_laser", source)
    shared_weights = _shared_weights(data.get("shared_weights", {}), len(experts), source)
    if shared_weights.method != "base" and base_laser is not None:
        raise ConfigError(
            f"{source}: `base_laser` and `shared_weights.method: {shared_weights.method}` both change the shared "
            "tensors; laser would reduce the base's matrices, not the merged ones. Use one of them."
        )

    if gate_mode in PROMPT_GATE_MODES:
        for index, expert in enumerate(experts):
            if not expert.positive_prompts:
                raise ConfigError(
                    f"{source}: experts[{index}] ({expert.source_model}) has no `positive_prompts`, "
                    f"but gate_mode `{gate_mode}` builds each router row from them. Add a few prompts "
                    "describing what this expert is good at, or use gate_mode `random`."
                )
    return MergeConfig(
        base_model=base_model,
        experts=experts,
        gate_mode=gate_mode,
        dtype=dtype,
        experts_per_token=experts_per_token,
        architecture=architecture,
        shared_experts=shared_experts,
        shared_weights=shared_weights,
        router=router,
        base_laser=base_laser,
        gate_mode_defaulted="gate_mode" not in data,
    )


def _expert(item: Any, path: str, source: str, keys: tuple[str, ...] = ()) -> ExpertConfig:
    data = _mapping(item, path, source)
    _check_keys(data, keys or EXPERT_KEYS, path, source)
    _require(data, "source_model", path, source)
    return ExpertConfig(
        source_model=_string(data["source_model"], f"{path}.source_model", source),
        positive_prompts=_prompts(data.get("positive_prompts"), f"{path}.positive_prompts", source),
        negative_prompts=_prompts(data.get("negative_prompts"), f"{path}.negative_prompts", source),
        noise_scale=_optional(data.get("noise_scale"), _non_negative_number, f"{path}.noise_scale", source),
        residual_scale=_optional(data.get("residual_scale"), _number, f"{path}.residual_scale", source),
        laser=_optional_laser(data.get("laser"), EXPERT_LASER_MATRICES, f"{path}.laser", source),
    )


def _shared_weights(item: Any, expert_count: int, source: str) -> SharedWeightsConfig:
    path = "shared_weights"
    data = _mapping(item, path, source)
    _check_keys(data, SHARED_WEIGHTS_KEYS, path, source)
    defaults = SharedWeightsConfig()
    method = _choice(data.get("method", defaults.method), TRUNK_METHODS, f"{path}.method", source)
    unused = [key for key in data if key != "method" and key not in TRUNK_METHOD_KEYS[method]]
    if unused:
        used = ", ".join(f"`{key}`" for key in TRUNK_METHOD_KEYS[method]) or "no other key"
        raise ConfigError(
            f"{source}: `{path}.{unused[0]}` has no effect with `{path}.method: {method}`, which reads {used}. "
            "Remove the key, or choose the method that uses it (see the Shared weights section of docs/config.md)."
        )
    weights = None
    if data.get("weights") is not None:
        weights = tuple(
            _number(value, f"{path}.weights[{index}]", source)
            for index, value in enumerate(_sequence(data["weights"], f"{path}.weights", source))
        )
        if len(weights) != expert_count:
            raise ConfigError(
                f"{source}: `{path}.weights` has {len(weights)} value(s), but there are {expert_count} expert(s). "
                "Give one weight per expert, in the order of `experts`."
            )
    density = _number(data.get("density", defaults.density), f"{path}.density", source)
    if not 0 < density <= 1:
        raise ConfigError(
            f"{source}: `{path}.density` is {density}; it must be in (0, 1] (the fraction of each delta kept)."
        )
    base_weight = _number(data.get("base_weight", defaults.base_weight), f"{path}.base_weight", source)
    normalize = _boolean(data.get("normalize", defaults.normalize), f"{path}.normalize", source)
    if method == "linear" and normalize:
        all_weights = (base_weight, *(weights or (1.0,) * expert_count))
        total = sum(all_weights)
        if abs(total) * MAX_LINEAR_AMPLIFICATION < sum(abs(weight) for weight in all_weights):
            raise ConfigError(
                f"{source}: `{path}` weights (base_weight and weights) sum to {total:g}, and normalize divides "
                f"each weight by that sum, so the result is undefined or set by their cancellation: when the sum "
                f"is under 1/{MAX_LINEAR_AMPLIFICATION:g} of the weights' total size, a 1% change of one weight "
                "can change the merged tensors by more than an expert's own difference from the base. Give weights "
                "whose sum is not close to 0 (positive weights always work), or set normalize: false."
            )
    return SharedWeightsConfig(
        method=method,
        weights=weights,
        base_weight=base_weight,
        density=density,
        scale=_number(data.get("lambda", defaults.scale), f"{path}.lambda", source),
        normalize=normalize,
    )


def _router(item: Any, path: str, gate_mode: str, source: str) -> RouterConfig:
    data = _mapping(item, path, source)
    _check_keys(data, ROUTER_KEYS, path, source)
    defaults = RouterConfig()
    raw_scale = data.get("scale")
    scale = None if raw_scale in (None, "auto") else _number(raw_scale, f"{path}.scale", source)
    if scale is not None and scale <= 0:
        raise ConfigError(f"{source}: `{path}.scale` is {scale}; it must be a positive number.")
    ridge_lambda = _non_negative_number(data.get("ridge_lambda", defaults.ridge_lambda), f"{path}.ridge_lambda", source)
    if ridge_lambda == 0:
        raise ConfigError(f"{source}: `{path}.ridge_lambda` must be greater than 0 (it keeps the fit stable).")
    return RouterConfig(
        pooling=_choice(data.get("pooling", defaults.pooling), POOLINGS, f"{path}.pooling", source),
        scale=scale,
        sequential=_boolean(data.get("sequential", defaults.sequential), f"{path}.sequential", source),
        ridge_lambda=ridge_lambda,
        input=_choice(data.get("input", defaults.input), ROUTER_INPUTS, f"{path}.input", source),
        logit_std=_positive_number(data.get("logit_std", defaults.logit_std), f"{path}.logit_std", source),
        center=_boolean(data.get("center", defaults.center), f"{path}.center", source),
        lead_in=_boolean(data.get("lead_in", defaults.lead_in), f"{path}.lead_in", source),
        continuation_tokens=_continuation_tokens(data.get("continuation_tokens"), gate_mode, path, source),
    )


def _continuation_tokens(value: Any, gate_mode: str, path: str, source: str) -> int:
    where = f"{path}.continuation_tokens"
    if value in (None, "auto"):
        return AUTO_CONTINUATION_TOKENS.get(gate_mode, 0)
    tokens = _integer(value, where, source)
    if not 0 <= tokens <= MAX_CONTINUATION_TOKENS:
        raise ConfigError(
            f"{source}: `{where}` is {tokens}; it must be between 0 and {MAX_CONTINUATION_TOKENS} "
            "(tokens the base model writes after each prompt; 16 to 64 is plenty)."
        )
    if tokens and gate_mode not in CONTINUING_GATE_MODES:
        raise ConfigError(
            f"{source}: `{where}` is {tokens}, but gate_mode `{gate_mode}` does not run the model on the prompts, "
            f"so nothing would use the continuations. It applies to gate modes "
            f"{' and '.join(sorted(CONTINUING_GATE_MODES))}; remove it or set it to 0."
        )
    return tokens


def _optional_laser(
    item: Any, matrix_groups: Mapping[str, tuple[str, ...]], path: str, source: str
) -> LaserConfig | None:
    if item is None:
        return None
    data = _mapping(item, path, source)
    _check_keys(data, LASER_KEYS, path, source)
    _require(data, "method", path, source)
    method = _choice(data["method"], LASER_METHODS, f"{path}.method", source)
    top_k = _optional(data.get("top_k"), _integer, f"{path}.top_k", source)
    keep_fraction = _optional(data.get("keep_fraction"), _number, f"{path}.keep_fraction", source)
    if top_k is not None and method != "snr":
        raise ConfigError(
            f"{source}: `{path}.top_k` only applies to method `snr` (it picks the lowest-SNR matrices), "
            f"but the method is `{method}`. Remove `top_k` or set `method: snr`."
        )
    if top_k is not None and top_k < 1:
        raise ConfigError(f"{source}: `{path}.top_k` is {top_k}; it must be 1 or more (how many matrices to reduce).")
    if method == "fixed" and keep_fraction is None:
        raise ConfigError(
            f"{source}: `{path}` uses method `fixed`, which needs `keep_fraction` (the fraction of each matrix's "
            "rank to keep, e.g. 0.05). Add it."
        )
    if keep_fraction is not None and method != "fixed":
        raise ConfigError(
            f"{source}: `{path}.keep_fraction` only applies to method `fixed`; method `{method}` chooses the rank "
            "from the singular values. Remove `keep_fraction` or set `method: fixed`."
        )
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ConfigError(
            f"{source}: `{path}.keep_fraction` is {keep_fraction}; it must be greater than 0 and at most 1 "
            "(the fraction of the rank kept, e.g. 0.05)."
        )
    return LaserConfig(
        method=method,
        matrices=_laser_matrices(data.get("matrices"), matrix_groups, f"{path}.matrices", source),
        layers=_laser_layers(data.get("layers", "all"), f"{path}.layers", source),
        top_k=top_k,
        keep_fraction=keep_fraction,
        calibration=_optional(data.get("calibration"), _string, f"{path}.calibration", source),
    )


def _laser_matrices(
    value: Any, matrix_groups: Mapping[str, tuple[str, ...]], path: str, source: str
) -> tuple[str, ...]:
    """Group names (`mlp`) expand to their matrices; the default is the first group."""
    if value is None:
        return next(iter(matrix_groups.values()))
    items = [value] if isinstance(value, str) else _sequence(value, path, source)
    allowed = {name for names in matrix_groups.values() for name in names}
    chosen: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _type_error(item, "a matrix name", f"{path}[{index}]", source)
        if item in matrix_groups:
            names = matrix_groups[item]
        elif item in allowed:
            names = (item,)
        else:
            valid = ", ".join([*matrix_groups, *sorted(allowed)])
            raise ConfigError(f"{source}: `{path}[{index}]` is {item!r}; it must be one of: {valid}.")
        chosen.extend(name for name in names if name not in chosen)
    if not chosen:
        raise ConfigError(f"{source}: `{path}` is empty. Name at least one matrix, e.g. `[mlp]`.")
    return tuple(chosen)


def _laser_layers(value: Any, path: str, source: str) -> str | tuple[int, ...]:
    """`all`, `last_half`, a range "20-31" (both ends included) or a list of layer indices."""
    if isinstance(value, str):
        if value in LASER_LAYER_WORDS:
            return value
        start, dash, end = value.partition("-")
        if dash and start.strip().isdigit() and end.strip().isdigit():
            first, last = int(start), int(end)
            if first > last:
                raise ConfigError(
                    f"{source}: `{path}` is the range {value!r}, whose start is after its end. Write it as "
                    f'"{last}-{first}".'
                )
            if last - first >= MAX_LASER_RANGE:
                raise ConfigError(
                    f"{source}: `{path}` is the range {value!r}, over {MAX_LASER_RANGE} layers; no model has that "
                    "many. Use `all` or the model's real layer numbers."
                )
            return tuple(range(first, last + 1))
        raise ConfigError(
            f'{source}: `{path}` is {value!r}; it must be `all`, `last_half`, a range such as "20-31" '
            "or a list of layer indices."
        )
    items = _sequence(value, path, source)
    if not items:
        raise ConfigError(f"{source}: `{path}` is an empty list. List at least one layer index, or use `all`.")
    indices = [_integer(item, f"{path}[{index}]", source) for index, item in enumerate(items)]
    for index, layer in enumerate(indices):
        if layer < 0:
            raise ConfigError(f"{source}: `{path}[{index}]` is {layer}; layer indices start at 0.")
    return tuple(sorted(set(indices)))


# The allowed keys of each mapping, for "unknown key, did you mean": the dataclasses' YAML fields.
MERGE_KEYS = yaml_keys(MergeConfig)
EXPERT_KEYS = yaml_keys(ExpertConfig)
SHARED_WEIGHTS_KEYS = yaml_keys(SharedWeightsConfig)
SHARED_EXPERT_KEYS = yaml_keys(ExpertConfig, without=("noise_scale", "laser"))
"""mergekit-moe's keys for a shared expert: an expert's keys but noise_scale and laser."""
ROUTER_KEYS = yaml_keys(RouterConfig)
LASER_KEYS = yaml_keys(LaserConfig)


def _where(path: str) -> str:
    return f"`{path}`" if path else "the top level"


def _check_keys(data: Mapping[str, Any], valid: tuple[str, ...], path: str, source: str) -> None:
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} in {_where(path)} is not a string. Keys must be names.")
        if key not in valid:
            full = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"Did you mean `{close[0]}`?" if close else f"Valid keys here: {', '.join(valid)}."
            raise ConfigError(f"{source}: unknown key `{full}`. {hint}")


def _require(data: Mapping[str, Any], key: str, path: str, source: str) -> None:
    if key not in data or data[key] is None:
        full = f"{path}.{key}" if path else key
        raise ConfigError(f"{source}: `{full}` is required but missing.")


def _type_error(value: Any, expected: str, path: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: `{path}` must be {expected}, not {type(value).__name__} {_bounded_repr(value)}.")


def _mapping(value: Any, path: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _type_error(value, "a mapping of keys to values", path, source)
    return value


def _sequence(value: Any, path: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise _type_error(value, "a list", path, source)
    return value


def _string(value: Any, path: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _type_error(value, "a non-empty string", path, source)
    return value


def _choice(value: Any, choices: tuple[str, ...], path: str, source: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{source}: `{path}` is {_bounded_repr(value)}; it must be one of: {', '.join(choices)}.")
    return value


def _integer(value: Any, path: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(value, "a whole number", path, source)
    return value


def _number(value: Any, path: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise _type_error(value, "a number", path, source)
    if abs(value) == float("inf"):
        raise _type_error(value, "a finite number", path, source)
    return float(value)


def _non_negative_number(value: Any, path: str, source: str) -> float:
    number = _number(value, path, source)
    if number < 0:
        raise ConfigError(f"{source}: `{path}` is {number}; it must be 0 or more.")
    return number


def _positive_number(value: Any, path: str, source: str) -> float:
    number = _number(value, path, source)
    if number <= 0:
        raise ConfigError(f"{source}: `{path}` is {number}; it must be greater than 0.")
    return number


def _boolean(value: Any, path: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(value, "true or false", path, source)
    return value


def _prompts(value: Any, path: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = _sequence(value, path, source)
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise _type_error(prompt, "a string (quote it in the YAML)", f"{path}[{index}]", source)
        if not prompt.strip():
            raise ConfigError(f"{source}: `{path}[{index}]` is an empty prompt. Remove it or write some text.")
    return tuple(items)


def _optional(value: Any, convert: Callable[[Any, str, str], T], path: str, source: str) -> T | None:
    return None if value is None else convert(value, path, source)
