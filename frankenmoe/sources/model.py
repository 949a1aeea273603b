"""Source models: a reference (folder or Hugging Face id) becomes a config plus a lazy tensor index
(resolve.py finds the folder, weights.py indexes its files); shapes and the experts' compatibility.

Nothing here reads tensor data; only config.json and safetensors headers are parsed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from frankenmoe.architectures.roles import (
    EMBEDDINGS,
    FINAL_NORM,
    LM_HEAD,
    MLP_PARTS,
    Weight,
    dims_shape,
    named_dimensions,
)
from frankenmoe.architectures.tables import SOURCE_FAMILIES, SourceFamily
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import FLOAT_DTYPES, TensorLocation, WeightFormat
from frankenmoe.sources.resolve import resolve_on_hub, resolve_reference
from frankenmoe.sources.weights import index_tensors

if TYPE_CHECKING:
    from frankenmoe.sources.hub import HubRepo
    from frankenmoe.sources.lora import LoraAdapter, LoraDelta


@dataclass(frozen=True)
class ModelShape:
    """The dimensions every expert must share with the base model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    hidden_act: str

    def dims(self) -> dict[str, int]:
        """The named dimensions that the family tables' shapes are written in."""
        return named_dimensions(
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )


@dataclass(frozen=True)
class SourceModel:
    reference: str
    path: Path
    config: dict[str, Any]
    family: SourceFamily
    shape: ModelShape
    tensors: dict[str, TensorLocation]
    adapter: LoraAdapter | None = None
    """A LoRA adapter applied to this model's MLPs (`source_model: model+adapter`, see lora.py)."""
    hub: HubRepo | None = None
    """The Hub repo and commit this model was resolved to this run; its weight files may not be downloaded yet."""

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def weight_format(self) -> WeightFormat:
        """Whether the weights came from safetensors files or from torch pickles (a folder is read in one format)."""
        pickled = any(location.file_format == "pickle" for location in self.tensors.values())
        return "pickle" if pickled else "safetensors"

    def lora_delta(self, name: str) -> LoraDelta | None:
        """The adapter's delta for tensor `name`, when this model carries an adapter that adapts it."""
        return None if self.adapter is None else self.adapter.delta(name)

    def tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(
                f"Model {self.reference} ({self.path}) has no tensor {name!r}, which the merge needs. "
                f"The checkpoint is incomplete or not a standard {self.family.name} layout."
            ) from None

    def has_weight(self, weight: Weight) -> bool:
        """Whether this model carries `weight`: always, or when its config sets the weight's flag."""
        return weight.flag is None or bool(self.config.get(weight.flag))

    def layer_weights(self) -> tuple[Weight, ...]:
        """The per-layer weights outside the MLP that this model has."""
        return tuple(weight for weight in self.family.layer_weights if self.has_weight(weight))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this model's files must hold, with the shape its config implies (from the family table)."""
        dims = self.shape.dims()
        expected = {EMBEDDINGS.name: dims_shape(EMBEDDINGS.shape, dims)}
        for layer in range(self.shape.num_hidden_layers):
            for weight in (*self.layer_weights(), *self.family.mlp.values()):
                expected[self.family.layer_name(layer, weight.name)] = dims_shape(weight.shape, dims)
        expected[FINAL_NORM.name] = dims_shape(FINAL_NORM.shape, dims)
        if not self.tie_word_embeddings:
            expected[LM_HEAD.name] = dims_shape(LM_HEAD.shape, dims)
        return expected

    def mlp_tensor_names(self) -> set[str]:
        return {
            self.family.mlp_name(layer, part) for layer in range(self.shape.num_hidden_layers) for part in MLP_PARTS
        }

    def skipped_tensors(self) -> tuple[str, ...]:
        """Tensors in the files that no merge needs: buffers recomputed from the config (inv_freq), and the
        copy of the embeddings some tied checkpoints also store as lm_head (every loader ties it back)."""
        derivable = {
            self.family.layer_name(layer, suffix)
            for layer in range(self.shape.num_hidden_layers)
            for suffix in self.family.derivable
        }
        if self.tie_word_embeddings:
            derivable.add(LM_HEAD.name)
        return tuple(sorted(name for name in self.tensors if name in derivable))

    def check_accounted(self) -> None:
        """Every tensor in the files is one the family table names for this config, or a derivable buffer.

        A tensor outside the table would otherwise be dropped silently (or crash a forward pass late).
        """
        expected = self.expected_shapes()
        unknown = sorted(set(self.tensors) - set(expected) - set(self.skipped_tensors()))
        if not unknown:
            return
        flagged = {
            self.family.layer_name(0, weight.name): weight.flag
            for weight in self.family.layer_weights
            if weight.flag is not None
        }
        hint = (
            f" Its config.json does not set {flagged[unknown[0]]}: true, yet the files carry those weights; "
            "fix config.json if the model really has them."
            if unknown[0] in flagged
            else ""
        )
        shown = ", ".join(repr(name) for name in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ModelError(
            f"Model {self.reference} ({self.path}) holds tensor(s) {shown} that a {self.family.name} model with this "
            f"config.json does not have, so frankenmoe cannot place them and refuses rather than drop them.{hint} "
            "Check that config.json's model_type matches the weights."
        )

    def check_tensors(self, names: set[str] | None = None) -> None:
        """Every needed tensor exists with the expected shape and a floating-point dtype."""
        for name, shape in self.expected_shapes().items():
            if names is not None and name not in names:
                continue
            location = self.tensor(name)
            if location.shape != shape:
                raise ModelError(
                    f"Tensor {name!r} in model {self.reference} ({location.file}) has shape {list(location.shape)}, "
                    f"but the model's config.json implies {list(shape)}. The weights and config.json do not belong together."
                )
            if location.dtype not in FLOAT_DTYPES:
                raise ModelError(
                    f"Tensor {name!r} in model {self.reference} ({location.file}) has dtype {location.dtype}; "
                    "frankenmoe needs floating-point weights (F32, F16, BF16). Quantised checkpoints cannot be merged."
                )


def load_source(reference: str) -> SourceModel:
    """Resolve a model reference and index its tensors (headers only, read over HTTP for a Hub repo's shards
    that are not in the cache)."""
    hub = resolve_on_hub(reference)
    path = resolve_reference(reference) if hub is None else hub.folder
    config = read_model_config(reference, path)
    model_type = config.get("model_type")
    family = SOURCE_FAMILIES.get(str(model_type))
    if family is None:
        raise ModelError(
            f"Model {reference} ({path}) has model_type {model_type!r}, which frankenmoe cannot merge. "
            f"Supported source model types: {', '.join(sorted(SOURCE_FAMILIES))}."
        )
    if hub is not None and hub.weight_format == "safetensors":
        from frankenmoe.sources.hub import remote_tensors

        tensors = remote_tensors(hub, reference)
    else:
        tensors = index_tensors(reference, path)  # a pickle repo's weights were downloaded by hub.resolve
    return SourceModel(reference, path, config, family, model_shape(reference, path, config), tensors, hub=hub)


def read_model_config(reference: str, path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"Model {reference} ({path}) has no config.json. Point source_model at a Hugging Face model folder "
            "(config.json plus *.safetensors weights)."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"Model {reference}: {config_path} cannot be read as JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ModelError(f"Model {reference}: {config_path} is not a JSON object.")
    return config


def model_shape(reference: str, path: Path, config: dict[str, Any]) -> ModelShape:
    values: dict[str, Any] = {}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(
                f"Model {reference}: {path / 'config.json'} has no valid {name!r} (found {value!r}). "
                "The config is incomplete."
            )
        values[name] = value
    values["num_key_value_heads"] = config.get("num_key_value_heads") or values["num_attention_heads"]
    values["head_dim"] = config.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    values["hidden_act"] = config.get("hidden_act", "silu")
    return ModelShape(**values)


def weight_formats_summary(models: Sequence[SourceModel]) -> str:
    """Which source models were read from pickle-format weights, in one line (dry run and model card)."""
    references = list(dict.fromkeys(model.reference for model in models))
    pickled = list(dict.fromkeys(model.reference for model in models if model.weight_format == "pickle"))
    if not pickled:
        return "safetensors"
    rest = "; the others safetensors" if len(pickled) < len(references) else ""
    return f"pickle-format (read with torch's weights-only unpickler): {', '.join(pickled)}{rest}"


def check_compatible(base: SourceModel, expert: SourceModel, expert_label: str, shared_expert: bool = False) -> None:
    """An expert's MLPs can replace the base's only if every dimension they touch agrees.

    A shared expert has a slot of its own size, so only its intermediate size may differ. The vocabulary
    never has to agree: only an expert's MLPs are read, and the merged model keeps the base's embeddings
    and tokenizer. Fine-tunes that added a token or two (32001, 32002) are common.
    """
    for field in fields(ModelShape):
        if field.name == "vocab_size":
            _warn_vocabulary(base, expert, expert_label)
            continue
        if shared_expert and field.name == "intermediate_size":
            continue
        base_value = getattr(base.shape, field.name)
        expert_value = getattr(expert.shape, field.name)
        if base_value != expert_value:
            raise ModelError(
                f"{expert_label} ({expert.reference}) does not match the base model ({base.reference}): "
                f"{field.name} is {expert_value} in the expert but {base_value} in the base. Every expert must be a "
                "fine-tune of the same base architecture."
            )


def _warn_vocabulary(base: SourceModel, expert: SourceModel, expert_label: str) -> None:
    extra = expert.shape.vocab_size - base.shape.vocab_size
    if extra == 0:
        return
    if extra > 0:
        consequence = (
            f"its {extra} added tokens are not in the base model's tokenizer, which the merged model uses, so the "
            "merged model cannot write them (often a chat template's special tokens)"
        )
    else:
        consequence = f"the base model's last {-extra} tokens were never seen by this expert in training"
    logging.getLogger("frankenmoe").warning(
        "%s (%s) has a vocabulary of %d tokens, the base model (%s) %d: %s. Only the expert's MLPs are merged, "
        "so the merge works; the model card records the difference.",
        expert_label,
        expert.reference,
        expert.shape.vocab_size,
        base.reference,
        base.shape.vocab_size,
        consequence,
    )
