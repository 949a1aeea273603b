"""Reading a PEFT LoRA adapter for a source model (`source_model: model+adapter`): its files, its lora_A/lora_B
pairs matched to the model's matrices, and the deltas that enter an expert (adapter_config.py reads its config and
refuses the settings a merge cannot carry)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from frankenmoe.architectures.roles import ATTENTION_PROJECTIONS, EMBEDDINGS, LM_HEAD, attention_projection_name
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import FLOAT_DTYPES, TensorLocation, read_header
from frankenmoe.sources.adapter_config import (
    MLP_KIND,
    PEFT_DEFAULT_ALPHA,
    pattern_value,
    peft_targets,
    read_adapter_config,
    refuse_unsupported,
)
from frankenmoe.sources.files import ADAPTER_CONFIG
from frankenmoe.sources.lora import LoraAdapter, LoraDelta, modules_phrase
from frankenmoe.sources.model import SourceModel
from frankenmoe.sources.resolve import resolve_reference

logger = logging.getLogger("frankenmoe")

SEPARATOR = "+"

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""Where peft's save_pretrained puts the matrices, in the order they are looked for."""

PEFT_PREFIX = "base_model.model."
"""What peft puts before a module's name in the saved file (PeftModel.base_model.model is the transformers model)."""

LORA_MATRICES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
"""peft's names for a module's two matrices, saved without the adapter name (no `.default`)."""

SAVED_LAYER = "base_layer.weight"

SAVED_LAYER_KINDS = ("embeddings", "lm_head")
"""peft also saves the adapted embeddings and head themselves (save_embedding_layers), in case training resized them."""

LEFT_OUT_KINDS = {
    "attention": "a MoE's attention is shared by every expert and comes from the base model",
    "embeddings": "the merged model's embeddings are the base model's",
    "lm_head": "the merged model's language-model head is the base model's",
}
"""Module kinds an adapter may adapt that cannot enter an expert, and why."""


def split_reference(reference: str) -> tuple[str, str | None]:
    """`model_ref+adapter_ref` -> (model_ref, adapter_ref); a reference without `+` has no adapter.

    An existing folder whose name holds a `+` is a model, not a model and an adapter.
    """
    if SEPARATOR not in reference or Path(reference).expanduser().is_dir():
        return reference, None
    parts = reference.split(SEPARATOR)
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ModelError(
            f"source_model {reference!r} is not `model+adapter`: that syntax takes one model reference, one `+` and "
            "one PEFT adapter reference (folder or Hugging Face id). A folder whose name holds `+` is read as a "
            "model only when it exists; rename it, or give it by a path without `+`."
        )
    return parts[0].strip(), parts[1].strip()


def load_adapter(reference: str, model: SourceModel, label: str) -> LoraAdapter:
    """Read an adapter's config and headers for `model` and check it fits, before any work.

    `label` names the expert in messages (experts[0], shared_experts[0]).
    """
    path = _adapter_folder(reference, model, label)
    config = read_adapter_config(reference, path, label)
    refuse_unsupported(reference, path, label, config)
    weight_file = _weight_file(reference, path, label)
    candidates = _candidate_modules(model)
    pairs = _lora_pairs(reference, weight_file, _adapter_tensors(weight_file), candidates)
    targeted = sorted(
        (module for module in candidates if peft_targets(config, module, candidates[module])), key=_natural_key
    )
    _warn_untargeted(reference, label, sorted(set(pairs) - set(targeted)))
    deltas: dict[str, LoraDelta] = {}
    left_out: dict[str, list[str]] = {}
    for module in targeted:
        kind = candidates[module]
        if kind != MLP_KIND:
            if module in pairs:
                left_out.setdefault(kind, []).append(module)
            continue
        if module not in pairs:
            raise ModelError(
                f"The LoRA adapter {reference} ({weight_file}) of {label} has no lora_A/lora_B matrices for "
                f"{module}, which its adapter_config.json's target_modules adapts: the file is incomplete or does not "
                "belong with this config. Save the adapter again with peft's save_pretrained."
            )
        weight = model.tensor(module + ".weight")
        deltas[weight.name] = _delta(reference, weight_file, label, config, module, weight, pairs[module])
    adapter = LoraAdapter(
        reference=reference,
        path=path,
        weight_file=weight_file,
        use_rslora=bool(config.get("use_rslora")),
        trained_on=str(config["base_model_name_or_path"]) if config.get("base_model_name_or_path") else None,
        deltas=deltas,
        left_out={kind: tuple(left_out[kind]) for kind in LEFT_OUT_KINDS if kind in left_out},
    )
    _warn_left_out(adapter, label)
    return adapter


def _warn_untargeted(reference: str, label: str, modules: list[str]) -> None:
    if modules:
        logger.warning(
            "%s: its LoRA adapter %s holds matrices for %d module(s) that its target_modules does not name (%s...); "
            "peft ignores them when it loads the adapter, and so does frankenmoe.",
            label,
            reference,
            len(modules),
            modules[0],
        )


def _warn_left_out(adapter: LoraAdapter, label: str) -> None:
    """One warning per module kind the expert cannot carry, and one if nothing of the adapter enters it."""
    for kind, modules in adapter.left_out.items():
        logger.warning(
            "%s: its LoRA adapter %s also adapts %s (%s); only its MLP part enters the expert, because %s. The model "
            "card records what was left out.",
            label,
            adapter.reference,
            kind,
            modules_phrase(modules),
            LEFT_OUT_KINDS[kind],
        )
    if not adapter.deltas:
        logger.warning(
            "%s: its LoRA adapter %s adapts no MLP matrix, so the expert is its model unchanged.",
            label,
            adapter.reference,
        )


def _adapter_folder(reference: str, model: SourceModel, label: str) -> Path:
    try:
        path = resolve_reference(reference)
    except ModelError as error:
        raise ModelError(
            f"The LoRA adapter {reference!r} of {label} ({model.reference}+{reference}) cannot be found: "
            f"{error.message}"
        ) from None
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(
            f"{label}: {path}, named after the `+` in its source_model, has no {ADAPTER_CONFIG}, so it is not a PEFT "
            "adapter. Point the part after `+` at the folder peft's save_pretrained wrote (adapter_config.json and "
            "adapter_model.safetensors), or remove `+...` to use a full model."
        )
    return path


def _weight_file(reference: str, path: Path, label: str) -> Path:
    for name in ADAPTER_FILES:
        if (path / name).is_file():
            return path / name
    raise ModelError(
        f"The LoRA adapter {reference} ({path}) of {label} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_FILES)}. "
        "The download or save is incomplete; fetch or save the adapter's weights into that folder."
    )


def _adapter_tensors(weight_file: Path) -> dict[str, TensorLocation]:
    if weight_file.suffix == ".safetensors":
        return read_header(weight_file)
    # Imported here: only pickle-format adapters need the unpickling machinery.
    from frankenmoe.io.pickles import read_pickle_index

    return read_pickle_index(weight_file)


def _candidate_modules(model: SourceModel) -> dict[str, str]:
    """Every module of `model` a LoRA adapter may adapt, by peft's module name, with its kind."""
    family = model.family
    candidates = {name.removesuffix(".weight"): MLP_KIND for name in sorted(model.mlp_tensor_names())}
    for layer in range(model.shape.num_hidden_layers):
        for projection in ATTENTION_PROJECTIONS:
            name = family.layer_name(layer, attention_projection_name(projection))
            candidates[name.removesuffix(".weight")] = "attention"
    candidates[EMBEDDINGS.name.removesuffix(".weight")] = "embeddings"
    candidates[LM_HEAD.name.removesuffix(".weight")] = "lm_head"
    return candidates


def _lora_pairs(
    reference: str, weight_file: Path, tensors: dict[str, TensorLocation], candidates: Mapping[str, str]
) -> dict[str, dict[str, TensorLocation]]:
    """Module name -> {"A": lora_A, "B": lora_B} from the file; any other tensor is refused by name."""
    pairs: dict[str, dict[str, TensorLocation]] = {}
    for name, location in tensors.items():
        module, matrix = _split_tensor_name(name)
        if matrix == SAVED_LAYER and module is not None and candidates.get(module) in SAVED_LAYER_KINDS:
            continue  # a copy of the embeddings or head, left out with them
        if module is None or matrix not in ("A", "B") or module not in candidates:
            raise ModelError(
                f"The LoRA adapter {reference} ({weight_file}) holds tensor {name!r}, which is not a lora_A/lora_B "
                "matrix of a module this model has (peft saves `base_model.model.<module>.lora_A.weight`). The adapter "
                "was made for another model or another LoRA variant; use an adapter trained on this model."
            )
        pairs.setdefault(module, {})[matrix] = location
    incomplete = sorted(module for module, pair in pairs.items() if len(pair) != 2)
    if incomplete:
        raise ModelError(
            f"The LoRA adapter {reference} ({weight_file}) has only one of lora_A and lora_B for {incomplete[0]}; the "
            "file is incomplete. Save the adapter again with peft's save_pretrained."
        )
    return pairs


def _split_tensor_name(name: str) -> tuple[str | None, str | None]:
    """(module, "A" / "B" / SAVED_LAYER) of a tensor peft saved; (None, None) for any other name."""
    if not name.startswith(PEFT_PREFIX):
        return None, None
    for suffix, matrix in (*LORA_MATRICES.items(), (SAVED_LAYER, SAVED_LAYER)):
        if name.endswith("." + suffix):
            return name[len(PEFT_PREFIX) : -len(suffix) - 1], matrix
    return None, None


def _delta(
    reference: str,
    weight_file: Path,
    label: str,
    config: dict[str, Any],
    module: str,
    weight: TensorLocation,
    pair: dict[str, TensorLocation],
) -> LoraDelta:
    """One module's delta, its shapes checked against the weight and its rank and scale from the config."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    lora_a, lora_b = pair["A"], pair["B"]
    out_features, in_features = weight.shape
    expected_a, expected_b = (rank, in_features), (out_features, rank)
    if lora_a.shape != expected_a or lora_b.shape != expected_b:
        raise ModelError(
            f"The LoRA adapter {reference} ({weight_file}) of {label} does not fit its model: for {module}, lora_A has "
            f"shape {list(lora_a.shape)} and lora_B {list(lora_b.shape)}, but the model's weight is "
            f"{list(weight.shape)} and the adapter's rank there is {rank}, which needs lora_A {list(expected_a)} and "
            f"lora_B {list(expected_b)}. The adapter was trained on a model of another shape (or its r / rank_pattern "
            "does not match its file); use the model it was trained on."
        )
    for location in (lora_a, lora_b):
        if location.dtype not in FLOAT_DTYPES:
            raise ModelError(
                f"Tensor {location.name!r} of the LoRA adapter {reference} ({weight_file}) has dtype {location.dtype}; "
                f"frankenmoe merges floating-point adapters ({', '.join(sorted(FLOAT_DTYPES))}), not quantised ones."
            )
    # Python floats, as peft computes its scaling: the same double, hence the same float32 product.
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraDelta(lora_a, lora_b, scale)


def _natural_key(module: str) -> tuple[Any, ...]:
    """Sort key putting layer 2 before layer 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in module.split("."))
