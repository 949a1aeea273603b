"""Source models: a reference (folder or Hugging Face id) becomes a config plus a lazy tensor index.

Nothing here reads tensor data; only config.json and safetensors headers are parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from frankenmoe.architectures import MLP_PARTS, SOURCE_FAMILIES, SourceFamily
from frankenmoe.errors import ModelError
from frankenmoe.tensor_io import FLOAT_DTYPES, TensorLocation, read_header

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


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


@dataclass(frozen=True)
class SourceModel:
    reference: str
    path: Path
    config: dict[str, Any]
    family: SourceFamily
    shape: ModelShape
    tensors: dict[str, TensorLocation]

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(
                f"Model {self.reference} ({self.path}) has no tensor {name!r}, which the merge needs. "
                "The checkpoint is incomplete or not a standard Llama/Mistral layout."
            ) from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a merge reads from this model, with the shape its config implies."""
        shape, family = self.shape, self.family
        attention_width = shape.num_attention_heads * shape.head_dim
        kv_width = shape.num_key_value_heads * shape.head_dim
        per_layer = {
            "input_layernorm.weight": (shape.hidden_size,),
            "self_attn.q_proj.weight": (attention_width, shape.hidden_size),
            "self_attn.k_proj.weight": (kv_width, shape.hidden_size),
            "self_attn.v_proj.weight": (kv_width, shape.hidden_size),
            "self_attn.o_proj.weight": (shape.hidden_size, attention_width),
            "post_attention_layernorm.weight": (shape.hidden_size,),
        }
        mlp = {
            "gate_proj": (shape.intermediate_size, shape.hidden_size),
            "up_proj": (shape.intermediate_size, shape.hidden_size),
            "down_proj": (shape.hidden_size, shape.intermediate_size),
        }
        expected: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (shape.vocab_size, shape.hidden_size),
            "model.norm.weight": (shape.hidden_size,),
        }
        if not self.tie_word_embeddings:
            expected[family.untied_lm_head] = (shape.vocab_size, shape.hidden_size)
        for layer in range(shape.num_hidden_layers):
            for suffix in family.layer_tensors:
                expected[family.layer_name(layer, suffix)] = per_layer[suffix]
            for part in MLP_PARTS:
                expected[family.mlp_name(layer, part)] = mlp[part]
        return expected

    def mlp_tensor_names(self) -> set[str]:
        return {
            self.family.mlp_name(layer, part) for layer in range(self.shape.num_hidden_layers) for part in MLP_PARTS
        }

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
    """Resolve a model reference and index its tensors (headers only)."""
    path = resolve_reference(reference)
    config = read_model_config(reference, path)
    model_type = config.get("model_type")
    family = SOURCE_FAMILIES.get(str(model_type))
    if family is None:
        raise ModelError(
            f"Model {reference} ({path}) has model_type {model_type!r}, which frankenmoe cannot merge into Mixtral. "
            f"Supported source model types: {', '.join(sorted(SOURCE_FAMILIES))}."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ModelError(
                f"Model {reference} ({path}) sets {flag}: true; Mixtral layers have no biases, so these weights "
                "cannot be represented. Use a model without biases."
            )
    return SourceModel(
        reference, path, config, family, _model_shape(reference, path, config), index_tensors(reference, path)
    )


def resolve_reference(reference: str) -> Path:
    """A local folder, or a Hugging Face repo id (`org/name` or `org/name@revision`) already in the cache."""
    candidate = Path(reference).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if reference.startswith((".", "/", "~")) or not HF_REPO_ID.match(reference):
        raise ModelError(
            f"Model folder {reference!r} does not exist (looked for {candidate.resolve()}). "
            "Check the path in the config; relative paths are relative to the current directory."
        )
    return _from_hf_cache(reference)


def _from_hf_cache(reference: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = reference.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ModelError(
            f"Model {reference!r} is not a local folder and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}). frankenmoe never downloads models itself: fetch it first with "
            f"`{fetch}`, or set source_model to a local folder."
        ) from None


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


def _model_shape(reference: str, path: Path, config: dict[str, Any]) -> ModelShape:
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


def index_tensors(reference: str, path: Path) -> dict[str, TensorLocation]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        shard_files = _shards_from_index(reference, index_path)
    else:
        shard_files = sorted(path.glob("*.safetensors"))
    if not shard_files:
        pickles = sorted({match.name for pattern in PICKLE_PATTERNS for match in path.glob(pattern)})
        if pickles:
            raise ModelError(
                f"Model {reference} ({path}) has only pickle weights ({', '.join(pickles)}). frankenmoe never "
                "unpickles files, because loading a pickle can run arbitrary code. Convert the model to safetensors "
                "first, e.g. load it once in a trusted environment and call save_pretrained(folder, safe_serialization=True)."
            )
        raise ModelError(
            f"Model {reference} ({path}) has no weights: looked for {INDEX_FILE} and *.safetensors files. "
            "Download or save the model's safetensors weights into that folder."
        )
    tensors: dict[str, TensorLocation] = {}
    for shard in shard_files:
        for name, location in read_header(shard).items():
            tensors.setdefault(name, location)
    return tensors


def _shards_from_index(reference: str, index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelError(
            f"Model {reference}: {index_path} is not a valid safetensors index (a JSON object with a weight_map)."
        ) from None
    shards: list[Path] = []
    for shard_name in sorted(set(map(str, weight_map.values()))):
        shard = index_path.parent / shard_name
        # Judged by the name, not by resolving links: Hugging Face cache shards are symlinks into its blob store.
        inside = not Path(shard_name).is_absolute() and ".." not in Path(shard_name).parts
        if not inside or not shard.is_file():
            raise ModelError(
                f"Model {reference}: {index_path.name} names shard {shard_name!r}, which does not exist in "
                f"{index_path.parent}. The download is incomplete; fetch the missing shard."
            )
        shards.append(shard)
    return shards


def check_compatible(base: SourceModel, expert: SourceModel, expert_label: str) -> None:
    """An expert's MLPs can replace the base's only if every dimension agrees."""
    for field in fields(ModelShape):
        base_value = getattr(base.shape, field.name)
        expert_value = getattr(expert.shape, field.name)
        if base_value != expert_value:
            raise ModelError(
                f"{expert_label} ({expert.reference}) does not match the base model ({base.reference}): "
                f"{field.name} is {expert_value} in the expert but {base_value} in the base. Every expert must be a "
                "fine-tune of the same base architecture."
            )
