"""The merge configuration: YAML in, frozen dataclasses out, every mistake named by its path.

The schema is mergekit-moe's, so configs written for it run unchanged; frankenmoe's own additions
(the `router` block) are optional.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from frankenmoe.errors import ConfigError

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "fit")
PROMPT_GATE_MODES = frozenset({"hidden", "cheap_embed", "fit"})
DTYPES = ("bfloat16", "float16", "float32")
ARCHITECTURES = ("mixtral",)
POOLINGS = ("mean", "last")

T = TypeVar("T")


@dataclass(frozen=True)
class ExpertConfig:
    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class RouterConfig:
    """How prompt hidden states become gate rows (frankenmoe's own options)."""

    pooling: str = "mean"
    scale: float | None = None
    sequential: bool = False
    ridge_lambda: float = 1.0


@dataclass(frozen=True)
class MergeConfig:
    base_model: str
    experts: tuple[ExpertConfig, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    architecture: str = "mixtral"
    router: RouterConfig = field(default_factory=RouterConfig)

    @property
    def needs_prompts(self) -> bool:
        return self.gate_mode in PROMPT_GATE_MODES


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
        raise ConfigError(
            f"{source_name} is not valid YAML: {problem} at {where}. "
            "Fix the YAML syntax there (indentation, quotes, a missing ':')."
        ) from None
    if data is None:
        raise ConfigError(f"{source_name} is empty. A config needs at least `base_model` and `experts`.")
    return _merge_config(_mapping(data, "the config", source_name), source_name)


def _merge_config(data: Mapping[str, Any], source: str) -> MergeConfig:
    _check_keys(data, MERGE_KEYS, "", source)
    _require(data, "base_model", "", source)
    _require(data, "experts", "", source)
    base_model = _string(data["base_model"], "base_model", source)
    raw_experts = _sequence(data["experts"], "experts", source)
    if not raw_experts:
        raise ConfigError(f"{source}: `experts` is empty. List at least one expert with a `source_model`.")
    experts = tuple(_expert(item, f"experts[{index}]", source) for index, item in enumerate(raw_experts))

    gate_mode = _choice(data.get("gate_mode", "hidden"), GATE_MODES, "gate_mode", source)
    dtype = None if data.get("dtype") is None else _choice(data["dtype"], DTYPES, "dtype", source)
    experts_per_token = _integer(data.get("experts_per_token", 2), "experts_per_token", source)
    if not 1 <= experts_per_token <= len(experts):
        raise ConfigError(
            f"{source}: `experts_per_token` is {experts_per_token}, but with {len(experts)} expert(s) "
            f"it must be between 1 and {len(experts)}."
        )
    architecture = _string(data.get("architecture", "mixtral"), "architecture", source)
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: `architecture: {architecture}` is not supported yet. "
            f"Supported: {', '.join(ARCHITECTURES)}; remove the key or set it to `mixtral`."
        )
    router = _router(data.get("router", {}), "router", source)

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
        router=router,
    )


def _expert(item: Any, path: str, source: str) -> ExpertConfig:
    data = _mapping(item, path, source)
    _check_keys(data, EXPERT_KEYS, path, source)
    _require(data, "source_model", path, source)
    return ExpertConfig(
        source_model=_string(data["source_model"], f"{path}.source_model", source),
        positive_prompts=_prompts(data.get("positive_prompts"), f"{path}.positive_prompts", source),
        negative_prompts=_prompts(data.get("negative_prompts"), f"{path}.negative_prompts", source),
        noise_scale=_optional(data.get("noise_scale"), _non_negative_number, f"{path}.noise_scale", source),
        residual_scale=_optional(data.get("residual_scale"), _number, f"{path}.residual_scale", source),
    )


def _router(item: Any, path: str, source: str) -> RouterConfig:
    data = _mapping(item, path, source)
    _check_keys(data, ROUTER_KEYS, path, source)
    defaults = RouterConfig()
    scale = _optional(data.get("scale"), _number, f"{path}.scale", source)
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
    )


MERGE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "architecture", "router")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
ROUTER_KEYS = ("pooling", "scale", "sequential", "ridge_lambda")


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
    return ConfigError(f"{source}: `{path}` must be {expected}, not {type(value).__name__} {value!r}.")


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
        raise ConfigError(f"{source}: `{path}` is {value!r}; it must be one of: {', '.join(choices)}.")
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
