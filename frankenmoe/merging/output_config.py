"""The output's architecture, tensor layout and config.json, chosen for the sources before anything is planned."""

from __future__ import annotations

from typing import Any

from frankenmoe import __version__
from frankenmoe.architectures.tables import OUTPUT_ARCHITECTURES, OutputArchitecture, OutputLayout
from frankenmoe.config.schema import MergeConfig
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.sources.model import SourceModel

EMPTY_SHARED_EXPERT_SIZE = 1
"""An output with a shared-expert slot but no shared expert gets one all-zero row there: it adds exactly
nothing. Size 0 loads in transformers, but llama.cpp reads a shared size of 0 as "the experts' size"."""


def choose_architecture(
    requested: str, base: SourceModel, experts: tuple[SourceModel, ...], shared_count: int
) -> tuple[OutputArchitecture, str]:
    """The output architecture for these sources, and why; refuses one that cannot hold them.

    `auto` takes the base family's natural output when it can hold every source, else the first
    output in the table that can.
    """
    if requested != "auto":
        arch = OUTPUT_ARCHITECTURES[requested]
        problem = _why_not(arch, base, experts, shared_count)
        if problem is None:
            return arch, "set in the config"
        fitting = [
            name
            for name, candidate in OUTPUT_ARCHITECTURES.items()
            if not _why_not(candidate, base, experts, shared_count)
        ]
        instead = f" Use `architecture: {fitting[0]}` (or `auto`)." if fitting else ""
        raise ConfigError(f"`architecture: {requested}` cannot hold these sources: {problem}.{instead}")
    natural = OUTPUT_ARCHITECTURES[base.family.natural_output]
    problem = _why_not(natural, base, experts, shared_count)
    if problem is None:
        return natural, f"auto: the natural output for {base.family.name} sources"
    for arch in OUTPUT_ARCHITECTURES.values():
        if _why_not(arch, base, experts, shared_count) is None:
            return arch, f"auto: {natural.model_type} cannot hold these sources ({problem})"
    raise ConfigError(f"No output architecture can hold these sources: {natural.model_type}: {problem}.")


def _why_not(
    arch: OutputArchitecture, base: SourceModel, experts: tuple[SourceModel, ...], shared_count: int
) -> str | None:
    # Only the base's attention, norms and embeddings enter the output; experts give their MLPs alone.
    family = base.family.name
    if family in arch.refuses:
        return f"the base model ({base.reference}) is a {family} model: {arch.refuses[family]}"
    if family not in arch.accepts:
        return f"the base model ({base.reference}) is a {family} model, which {arch.model_type} does not take"
    lost = sorted(weight.name for weight in base.layer_weights() if weight.name not in arch.layer_slot_names())
    if lost:
        return (
            f"the base model's {', '.join(lost)} (every layer) would be lost: {arch.model_type}'s attention has no "
            "place for them"
        )
    if shared_count and arch.shared_expert is None:
        return f"the config has a shared expert, which {arch.model_type} has no slot for"
    if arch.shared_expert is not None and shared_count > arch.shared_expert.max_count:
        return (
            f"the config has {shared_count} shared experts, but {arch.model_type} has "
            f"{arch.shared_expert.max_count} shared-expert slot per layer; keep one"
        )
    return None


def choose_layout(arch: OutputArchitecture, layout_name: str | None) -> OutputLayout:
    """The tensor layout --layout names (None: the architecture's default), refused if the architecture lacks it."""
    if layout_name is None:
        return arch.layouts[arch.default_layout]
    if layout_name not in arch.layouts:
        raise ConfigError(
            f"--layout {layout_name} is not a tensor layout of {arch.model_type}; it has: {', '.join(arch.layouts)}."
        )
    return arch.layouts[layout_name]


def rope_fields(base_config: dict[str, Any]) -> dict[str, Any]:
    """The base model's rope settings in both spellings readers use, derived from one resolved value.

    transformers 5 writes only `rope_parameters`; transformers 4.x, vLLM and other readers look for
    `rope_theta` / `rope_scaling` and silently fall back to a default theta when they are missing.
    transformers resolves what the base config means (its family's default theta included).
    """
    from transformers import AutoConfig

    resolved = AutoConfig.for_model(**base_config)
    parameters = dict(getattr(resolved, "rope_parameters", None) or {})
    theta = parameters.get("rope_theta", getattr(resolved, "rope_theta", None))
    if theta is None:
        raise ModelError(
            f"The base model's config.json gives no rope theta that transformers can resolve ({parameters})."
        )
    parameters = {"rope_type": "default", **parameters, "rope_theta": theta}
    scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    return {
        "rope_theta": theta,
        "rope_scaling": None if scaling.get("rope_type") == "default" and len(scaling) == 1 else scaling,
        "rope_parameters": parameters,
    }


def output_config(
    arch: OutputArchitecture,
    base: SourceModel,
    config: MergeConfig,
    dtype_name: str,
    expert_count: int,
    shared_expert: SourceModel | None = None,
) -> dict[str, Any]:
    """The output's config.json: the base's carried fields, rope in both spellings, and the MoE's own fields."""
    output: dict[str, Any] = {"architectures": [arch.class_name], "model_type": arch.model_type}
    for key in arch.carried_fields:
        if key in base.config:
            output[key] = base.config[key]
    for key, default in arch.carried_defaults.items():
        output[key] = base.config.get(key, default)
    output.update(rope_fields(base.config))
    output.update(arch.fixed_fields)
    output.update(
        num_key_value_heads=base.shape.num_key_value_heads,
        head_dim=base.shape.head_dim,
        hidden_act=base.shape.hidden_act,
        tie_word_embeddings=base.tie_word_embeddings and not arch.explicit_head,
        intermediate_size=base.shape.intermediate_size,
        num_experts_per_tok=config.experts_per_token,
        torch_dtype=dtype_name,
        frankenmoe_version=__version__,
    )
    output[arch.expert_count_key] = expert_count
    output[arch.expert_size_key] = base.shape.intermediate_size
    if arch.shared_expert is not None:
        output[arch.shared_expert.size_key] = (
            EMPTY_SHARED_EXPERT_SIZE if shared_expert is None else shared_expert.shape.intermediate_size
        )
    return output
