"""A PEFT LoRA adapter's adapter_config.json: reading it, the settings a merge refuses (each with its reason),
and which of the model's modules it adapts, with what rank and alpha."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from frankenmoe.errors import ModelError
from frankenmoe.sources.files import ADAPTER_CONFIG

ALL_LINEAR = "all-linear"

PEFT_DEFAULT_ALPHA = 8
"""LoraConfig's lora_alpha when a config file leaves it out."""

MLP_KIND = "mlp"

LINEAR_KINDS = (MLP_KIND, "attention")
"""What `target_modules: all-linear` adapts in these families (peft leaves the output layer out)."""

REFUSED_SETTINGS = {
    "use_dora": "DoRA rescales every merged column by a trained magnitude vector, which frankenmoe does not implement",
    "modules_to_save": "it carries fully trained copies of {value}, which would replace the model's own modules, and "
    "frankenmoe merges only LoRA matrices",
    "lora_bias": "it trained a bias on lora_B, and the MLP matrices frankenmoe merges have no bias",
}
"""Settings that change what merging the adapter means, each refused (when set) with its reason."""

WEIGHT_NEUTRAL_SETTINGS = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "lora_dropout",
        # peft resets it to false for nn.Linear layers, which every adapted matrix here is.
        "fan_in_fan_out",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "runtime_config",
    }
)
"""Settings that do not change the merged weights (training, initialisation or loading options)."""

READ_SETTINGS = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "bias",
        "init_lora_weights",
    }
)

KNOWN_SETTINGS = READ_SETTINGS | WEIGHT_NEUTRAL_SETTINGS | frozenset(REFUSED_SETTINGS)

BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")
"""Initialisations that also change the base weights: such an adapter, unless converted when saved
(which sets init_lora_weights back to true), only fits the changed base, not the published one."""


def read_adapter_config(reference: str, path: Path, label: str) -> dict[str, Any]:
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(
            f"The LoRA adapter {reference} of {label}: {config_path} cannot be read as JSON ({error})."
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"The LoRA adapter {reference} of {label}: {config_path} is not a JSON object.")
    return config


def refuse_unsupported(reference: str, path: Path, label: str, config: dict[str, Any]) -> None:
    """Refuse an adapter whose merge is not W + scale * B @ A on the MLP matrices (the reason in the message)."""
    reason = _unsupported_reason(config)
    if reason is not None:
        raise ModelError(
            f"The adapter {reference} ({path / ADAPTER_CONFIG}) of {label} cannot be merged: {reason}. Merge it into "
            "its model with peft (PeftModel.from_pretrained(model, adapter).merge_and_unload(), then save_pretrained) "
            "and use that folder as source_model."
        )


def _unsupported_reason(config: dict[str, Any]) -> str | None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return f"it is a {peft_type} adapter (peft_type), and frankenmoe merges LoRA adapters only"
    for key, reason in REFUSED_SETTINGS.items():
        if config.get(key):
            return f"{key} is set: " + reason.format(value=config[key])
    bias = config.get("bias", "none")
    if bias != "none":
        return f'bias is "{bias}": it trained biases, and the MLP matrices frankenmoe merges have no bias'
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        return (
            f'init_lora_weights is "{init}", which also changes the base weights, so the adapter only fits that '
            "changed base (save it with path_initial_model_for_weight_conversion to make a plain LoRA)"
        )
    unknown = sorted(key for key, value in config.items() if value and key not in KNOWN_SETTINGS)
    if unknown:
        return f"it sets {unknown[0]} ({config[unknown[0]]!r}), a LoRA variant frankenmoe does not implement"
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            return f"its {key} is {config[key]!r}, not a mapping of module names to values"
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(_is_positive(rank, whole=True) for rank in ranks):
        return f"its r / rank_pattern give {ranks!r}, and a rank is a positive whole number"
    alphas = [config.get("lora_alpha", PEFT_DEFAULT_ALPHA), *(config.get("alpha_pattern") or {}).values()]
    if not all(_is_positive(alpha, whole=False) for alpha in alphas):
        return f"its lora_alpha / alpha_pattern give {alphas!r}, and lora_alpha is a positive number"
    if not config.get("target_modules"):
        return "its target_modules is empty, so which modules peft would adapt depends on peft's per-model defaults"
    return None


def _is_positive(value: object, whole: bool) -> bool:
    """A positive number (a whole one when `whole`), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value > 0 and (isinstance(value, int) or not whole)


def peft_targets(config: dict[str, Any], module: str, kind: str) -> bool:
    """Whether peft adapts `module` under this config (target_modules, exclude_modules, layers_to_transform)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and _named_in(module, exclude):
        return False
    targets = config["target_modules"]
    if targets == ALL_LINEAR:
        found = kind in LINEAR_KINDS
    elif isinstance(targets, str):
        # A string is a regular expression over the whole module name, and then the layer options do not apply.
        return re.fullmatch(targets, module) is not None
    else:
        found = _named_in(module, targets)
    layers = config.get("layers_to_transform")
    if not found or layers is None or layers == []:
        return found
    index = _layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _named_in(module: str, names: list[str]) -> bool:
    """A list names a module by its full name or by its last components (`gate_proj`, `mlp.gate_proj`)."""
    return any(module == name or module.endswith("." + name) for name in names)


def _layer_index(module: str, layers_pattern: str | list[str] | None) -> int | None:
    """The first layer number in a module name: after the component(s) `layers_pattern` names, when given."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    # Without a pattern, the number after the second component or later; an empty pattern counts as none.
    expressions = [rf"(?:.*?\.)?(?:{pattern})\.(\d+)\." for pattern in patterns if pattern] or [r".*?\.[^.]*\.(\d+)\."]
    for expression in expressions:
        match = re.match(expression, module)
        if match:
            return int(match.group(1))
    return None


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern: the first key that matches the end of the module name, by whole components."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default
