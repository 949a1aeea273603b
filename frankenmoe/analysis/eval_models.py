"""The dense models `frankenmoe eval` compares a MoE with: its base and experts from its manifest (each checked to
be still the model the merge read), or named with --model NAME=REF."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.tables import SOURCE_FAMILIES
from frankenmoe.checkpoint.manifest import MANIFEST_NAME, read_manifest, weight_fingerprint
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.sources.model import read_model_config
from frankenmoe.sources.resolve import resolve_reference
from frankenmoe.sources.weights import index_tensors


@dataclass(frozen=True)
class ModelSpec:
    """A dense model to score: its name, role (base or expert), reference and folder."""

    name: str
    role: str
    reference: str
    path: Path


def resolve_models(checkpoint: Path, overrides: Mapping[str, str]) -> list[ModelSpec]:
    """The base and each expert from the checkpoint's manifest (`base`, `expert0`, `expert1`, ...), with
    `overrides` (name -> model reference) replacing or adding entries; without a manifest, `overrides`
    must name the base (`base=REF`) and the rest are experts. Each source must still be where the manifest
    says, with the weight files it recorded."""
    if not (checkpoint / MANIFEST_NAME).is_file():
        if not overrides:
            raise ModelError(
                f"{checkpoint} has no {MANIFEST_NAME}, so its base and experts are unknown. Name them with "
                "--model base=REF --model NAME=REF ... (a folder or a Hugging Face id in the local cache)."
            )
        if "base" not in overrides:
            raise ConfigError(
                f"{checkpoint} has no {MANIFEST_NAME}; name its base model too, with --model base=REF "
                f"(given: {', '.join(overrides)})."
            )
        return [_given(name, reference) for name, reference in overrides.items()]
    specs: dict[str, ModelSpec] = {}
    for record in read_manifest(checkpoint).get("sources", []):
        role = str(record.get("role", ""))
        name = "base" if role == "base" else role.replace("experts[", "expert").rstrip("]")
        if not (role == "base" or role.startswith("experts[")):
            continue  # the shared expert: an MLP every token already passes through, not a source to beat
        specs[name] = _given(name, overrides[name]) if name in overrides else _recorded(name, role, record)
    specs.update({name: _given(name, reference) for name, reference in overrides.items() if name not in specs})
    return list(specs.values())


def _given(name: str, reference: str) -> ModelSpec:
    return ModelSpec(name, "base" if name == "base" else "expert", reference, resolve_reference(reference))


def _recorded(name: str, role: str, record: Mapping[str, Any]) -> ModelSpec:
    reference = str(record.get("reference"))
    folder = Path(str(record.get("folder")))
    fix = f"Put it back, or name where it is now with --model {name}=REF."
    if record.get("adapter_files"):
        raise ModelError(
            f"Source {role} ({reference}) is a model plus a LoRA adapter, which eval cannot run as a dense model. "
            f"Merge the adapter into a folder and pass --model {name}=FOLDER."
        )
    if not folder.is_dir():
        raise ModelError(
            f"Source {role} ({reference}) is no longer at {folder}, where the manifest says the merge read it. {fix}"
        )
    for file in record.get("files", []):
        path = folder / str(file.get("name"))
        if not path.is_file():
            raise ModelError(f"Source {role} ({reference}): {path}, which the merge read, is gone. {fix}")
        if "sampled_sha256" in file and weight_fingerprint(path) != file:
            raise ModelError(
                f"Source {role} ({reference}): {path} is not the file the merge read (its size or sampled hash "
                f"changed), so it is not the model the MoE was built from. {fix}"
            )
    return ModelSpec(name, "base" if role == "base" else "expert", reference, folder)


@dataclass(frozen=True)
class Runnable:
    config: dict[str, Any]
    tensors: Mapping[str, TensorLocation]


def dense_model(spec: ModelSpec, vocab_size: int) -> Runnable:
    config = read_model_config(spec.reference, spec.path)
    if str(config.get("model_type")) not in SOURCE_FAMILIES:
        raise ModelError(
            f"Model {spec.name} ({spec.reference}) has model_type {config.get('model_type')!r}; eval scores dense "
            f"sources of the families {', '.join(sorted(SOURCE_FAMILIES))}."
        )
    if int(config.get("vocab_size", -1)) != vocab_size:
        raise ModelError(
            f"Model {spec.name} ({spec.reference}) has a vocabulary of {config.get('vocab_size')}, the checkpoint "
            f"{vocab_size}: they do not share its tokenizer, so their perplexities cannot be compared."
        )
    return Runnable(config, index_tensors(spec.reference, spec.path))
