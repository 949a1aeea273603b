"""The merge configuration: YAML in, frozen dataclasses out, every mistake named by its path.

The schema is mergekit-moe's, so configs written for it run unchanged; frankenmoe's own additions
(the `router` block) are optional. The dataclasses and their keys are frankenmoe.config.schema's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from frankenmoe.architectures.tables import ARCHITECTURE_NAMES
from frankenmoe.config.constants import (
    AUTO_CONTINUATION_TOKENS,
    BASE_LASER_MATRICES,
    CONTINUING_GATE_MODES,
    DEFAULT_GATE_MODE,
    DTYPES,
    EXPERT_LASER_MATRICES,
    GATE_MODES,
    LASER_LAYER_WORDS,
    LASER_METHODS,
    MAX_CONTINUATION_TOKENS,
    MAX_LASER_RANGE,
    MAX_LINEAR_AMPLIFICATION,
    POOLINGS,
    PROMPT_GATE_MODES,
    ROUTER_INPUTS,
    TRUNK_METHOD_KEYS,
    TRUNK_METHODS,
)
from frankenmoe.config.schema import (
    EXPERT_KEYS,
    LASER_KEYS,
    MERGE_KEYS,
    ROUTER_KEYS,
    SHARED_EXPERT_KEYS,
    SHARED_WEIGHTS_KEYS,
    ExpertConfig,
    LaserConfig,
    MergeConfig,
    RouterConfig,
    SharedWeightsConfig,
)
from frankenmoe.config.values import (
    as_boolean,
    as_choice,
    as_integer,
    as_mapping,
    as_non_negative_number,
    as_number,
    as_positive_number,
    as_prompts,
    as_sequence,
    as_string,
    check_keys,
    optional,
    require,
    type_error,
)
from frankenmoe.config.yaml_text import read_yaml
from frankenmoe.errors import ConfigError


def load_config(path: Path) -> MergeConfig:
    """Read and validate a merge config file."""
    return parse_config(read_config_text(path), str(path))


def read_config_text(path: Path) -> str:
    """A config file's text, read once: a merge parses it and records it (model card, manifest)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist. Check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Config file {path} cannot be read: {error}.") from None


def parse_config(text: str, source_name: str = "<config>") -> MergeConfig:
    """Parse YAML text into a validated MergeConfig; every failure is a ConfigError."""
    data = read_yaml(text, source_name)
    if data is None:
        raise ConfigError(f"{source_name} is empty. A config needs at least `base_model` and `experts`.")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source_name} must be a mapping of keys to values (`base_model: ...`, `experts: ...`), "
            f"not a {type(data).__name__}."
        )
    return _merge_config(data, source_name)


def _merge_config(data: Mapping[str, Any], source: str) -> MergeConfig:
    check_keys(data, MERGE_KEYS, "", source)
    require(data, "base_model", "", source)
    require(data, "experts", "", source)
    base_model = as_string(data["base_model"], "base_model", source)
    raw_experts = as_sequence(data["experts"], "experts", source)
    if not raw_experts:
        raise ConfigError(f"{source}: `experts` is empty. List at least one expert with a `source_model`.")
    experts = tuple(_expert(item, f"experts[{index}]", source) for index, item in enumerate(raw_experts))

    gate_mode = as_choice(data.get("gate_mode", DEFAULT_GATE_MODE), GATE_MODES, "gate_mode", source)
    dtype = None if data.get("dtype") is None else as_choice(data["dtype"], DTYPES, "dtype", source)
    experts_per_token = as_integer(data.get("experts_per_token", 2), "experts_per_token", source)
    if not 1 <= experts_per_token <= len(experts):
        raise ConfigError(
            f"{source}: `experts_per_token` is {experts_per_token}, but with {len(experts)} expert(s) "
            f"it must be between 1 and {len(experts)}."
        )
    architecture = as_choice(data.get("architecture", "auto"), ARCHITECTURE_NAMES, "architecture", source)
    shared_experts = tuple(
        _expert(item, f"shared_experts[{index}]", source, SHARED_EXPERT_KEYS)
        for index, item in enumerate(as_sequence(data.get("shared_experts", []), "shared_experts", source))
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
    data = as_mapping(item, path, source)
    check_keys(data, keys or EXPERT_KEYS, path, source)
    require(data, "source_model", path, source)
    return ExpertConfig(
        source_model=as_string(data["source_model"], f"{path}.source_model", source),
        positive_prompts=as_prompts(data.get("positive_prompts"), f"{path}.positive_prompts", source),
        negative_prompts=as_prompts(data.get("negative_prompts"), f"{path}.negative_prompts", source),
        noise_scale=optional(data.get("noise_scale"), as_non_negative_number, f"{path}.noise_scale", source),
        residual_scale=optional(data.get("residual_scale"), as_number, f"{path}.residual_scale", source),
        laser=_optional_laser(data.get("laser"), EXPERT_LASER_MATRICES, f"{path}.laser", source),
    )


def _shared_weights(item: Any, expert_count: int, source: str) -> SharedWeightsConfig:
    path = "shared_weights"
    data = as_mapping(item, path, source)
    check_keys(data, SHARED_WEIGHTS_KEYS, path, source)
    defaults = SharedWeightsConfig()
    method = as_choice(data.get("method", defaults.method), TRUNK_METHODS, f"{path}.method", source)
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
            as_number(value, f"{path}.weights[{index}]", source)
            for index, value in enumerate(as_sequence(data["weights"], f"{path}.weights", source))
        )
        if len(weights) != expert_count:
            raise ConfigError(
                f"{source}: `{path}.weights` has {len(weights)} value(s), but there are {expert_count} expert(s). "
                "Give one weight per expert, in the order of `experts`."
            )
    density = as_number(data.get("density", defaults.density), f"{path}.density", source)
    if not 0 < density <= 1:
        raise ConfigError(
            f"{source}: `{path}.density` is {density}; it must be in (0, 1] (the fraction of each delta kept)."
        )
    base_weight = as_number(data.get("base_weight", defaults.base_weight), f"{path}.base_weight", source)
    normalize = as_boolean(data.get("normalize", defaults.normalize), f"{path}.normalize", source)
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
        scale=as_number(data.get("lambda", defaults.scale), f"{path}.lambda", source),
        normalize=normalize,
    )


def _router(item: Any, path: str, gate_mode: str, source: str) -> RouterConfig:
    data = as_mapping(item, path, source)
    check_keys(data, ROUTER_KEYS, path, source)
    defaults = RouterConfig()
    raw_scale = data.get("scale")
    scale = None if raw_scale in (None, "auto") else as_number(raw_scale, f"{path}.scale", source)
    if scale is not None and scale <= 0:
        raise ConfigError(f"{source}: `{path}.scale` is {scale}; it must be a positive number.")
    ridge_lambda = as_non_negative_number(
        data.get("ridge_lambda", defaults.ridge_lambda), f"{path}.ridge_lambda", source
    )
    if ridge_lambda == 0:
        raise ConfigError(f"{source}: `{path}.ridge_lambda` must be greater than 0 (it keeps the fit stable).")
    return RouterConfig(
        pooling=as_choice(data.get("pooling", defaults.pooling), POOLINGS, f"{path}.pooling", source),
        scale=scale,
        sequential=as_boolean(data.get("sequential", defaults.sequential), f"{path}.sequential", source),
        ridge_lambda=ridge_lambda,
        input=as_choice(data.get("input", defaults.input), ROUTER_INPUTS, f"{path}.input", source),
        logit_std=as_positive_number(data.get("logit_std", defaults.logit_std), f"{path}.logit_std", source),
        center=as_boolean(data.get("center", defaults.center), f"{path}.center", source),
        lead_in=as_boolean(data.get("lead_in", defaults.lead_in), f"{path}.lead_in", source),
        continuation_tokens=_continuation_tokens(data.get("continuation_tokens"), gate_mode, path, source),
    )


def _continuation_tokens(value: Any, gate_mode: str, path: str, source: str) -> int:
    where = f"{path}.continuation_tokens"
    if value in (None, "auto"):
        return AUTO_CONTINUATION_TOKENS.get(gate_mode, 0)
    tokens = as_integer(value, where, source)
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
    data = as_mapping(item, path, source)
    check_keys(data, LASER_KEYS, path, source)
    require(data, "method", path, source)
    method = as_choice(data["method"], LASER_METHODS, f"{path}.method", source)
    top_k = optional(data.get("top_k"), as_integer, f"{path}.top_k", source)
    keep_fraction = optional(data.get("keep_fraction"), as_number, f"{path}.keep_fraction", source)
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
        calibration=optional(data.get("calibration"), as_string, f"{path}.calibration", source),
    )


def _laser_matrices(
    value: Any, matrix_groups: Mapping[str, tuple[str, ...]], path: str, source: str
) -> tuple[str, ...]:
    """Group names (`mlp`) expand to their matrices; the default is the first group."""
    if value is None:
        return next(iter(matrix_groups.values()))
    items = [value] if isinstance(value, str) else as_sequence(value, path, source)
    allowed = {name for names in matrix_groups.values() for name in names}
    chosen: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise type_error(item, "a matrix name", f"{path}[{index}]", source)
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
    items = as_sequence(value, path, source)
    if not items:
        raise ConfigError(f"{source}: `{path}` is an empty list. List at least one layer index, or use `all`.")
    indices = [as_integer(item, f"{path}[{index}]", source) for index, item in enumerate(items)]
    for index, layer in enumerate(indices):
        if layer < 0:
            raise ConfigError(f"{source}: `{path}[{index}]` is {layer}; layer indices start at 0.")
    return tuple(sorted(set(indices)))
