"""Small random-weight dense models of any source family on disk, for the demo, the tests and the benchmarks.

Tensors are generated one at a time and streamed into the file, so even the benchmark's 1.1B
shape is written without holding the model in memory. Every tensor is seeded by its name, so a
base model and its "fine-tunes" share all non-MLP weights exactly and differ only in their MLPs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.architectures.tables import SOURCE_FAMILIES, SourceFamily
from frankenmoe.io.safetensors import CONFIG_DTYPE_TO_SAFETENSORS, DTYPES
from frankenmoe.io.shards import ShardEntry, ShardWriter, tensor_bytes
from frankenmoe.sources.model import SourceModel, model_shape

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": 4096,
}


@dataclass(frozen=True)
class ToyShape:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 32000
    max_position_embeddings: int = 512


SHAPES = {
    "tiny": ToyShape(),
    "small": ToyShape(1024, 8, 2816, 16, 8, 32000, 2048),
    "large": ToyShape(2048, 22, 5632, 32, 4, 32000, 2048),
    # Mistral-7B's shape (14.5 GB in bfloat16 per model): benchmarks only, written tensor by tensor.
    "mistral7b": ToyShape(4096, 32, 14336, 32, 8, 32000, 32768),
}


def mistral_tokenizer_model() -> Path:
    """Mistral's 32000-piece SentencePiece model, shipped inside the mistral-common wheel."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The toy models need a tokenizer from the `mistral-common` package: pip install mistral-common"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"


def write_toy_model(
    folder: Path,
    *,
    shape: ToyShape = SHAPES["tiny"],
    model_type: str = "mistral",
    dtype: str = "float32",
    base_seed: int = 0,
    mlp_seed: int | None = None,
    tie_word_embeddings: bool = False,
    weight_std: float = 0.02,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write config.json, model.safetensors and a real tokenizer into `folder`.

    Any source family of the tables can be written (`model_type`); its weights and their shapes come
    from the family's entry, and `extra_config` (e.g. attention_bias, rope_parameters) is merged into
    config.json before they are derived. Models sharing `base_seed` have identical attention, norms
    and embeddings; `mlp_seed` (default: `base_seed`) seeds the MLP weights, so different values make
    different "fine-tunes".
    """
    family = SOURCE_FAMILIES[model_type]
    folder.mkdir(parents=True, exist_ok=True)
    config = _toy_config(family, model_type, shape, dtype, tie_word_embeddings, extra_config)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    source = SourceModel("toy", folder, config, family, model_shape("toy", folder, config), {})
    _write_weights(folder / "model.safetensors", source, dtype, base_seed, mlp_seed, weight_std)
    return folder


def _toy_config(
    family: SourceFamily,
    model_type: str,
    shape: ToyShape,
    dtype: str,
    tie_word_embeddings: bool,
    extra_config: dict[str, Any] | None,
) -> dict[str, Any]:
    """config.json of a toy model: the shape's dimensions, silu, RoPE, token ids 1 and 2, then `extra_config`."""
    return {
        "architectures": [family.class_name],
        "model_type": model_type,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        **(extra_config or {}),
    }


def _write_weights(
    path: Path, source: SourceModel, dtype: str, base_seed: int, mlp_seed: int | None, weight_std: float
) -> None:
    """Every tensor the source's config implies, generated and streamed into one safetensors file one at a time."""
    tensors = list(source.expected_shapes().items())
    mlp_names = source.mlp_tensor_names()
    safetensors_dtype = CONFIG_DTYPE_TO_SAFETENSORS[dtype]
    writer = ShardWriter(
        path,
        [ShardEntry(name, safetensors_dtype, tensor_shape) for name, tensor_shape in tensors],
        {"format": "pt"},
    )
    for name, tensor_shape in tensors:
        seed = mlp_seed if name in mlp_names and mlp_seed is not None else base_seed
        writer.begin(name)
        values = _toy_tensor(name, tensor_shape, seed, weight_std)
        writer.write_bytes(tensor_bytes(values.to(DTYPES[safetensors_dtype][0])))
    writer.close()


def _toy_tensor(name: str, shape: tuple[int, ...], seed: int, weight_std: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    values = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * values
    return values * weight_std
