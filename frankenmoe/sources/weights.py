"""Finding a model folder's weight files (safetensors, or torch pickles) and indexing their tensors as byte ranges.

Only headers (or pickle indexes) are read, never tensor data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import INDEX_NAME, TensorLocation, WeightFormat, read_header
from frankenmoe.sources.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS_PREFIX,
    PICKLE_INDEX_FILE,
    PICKLE_PATTERNS,
    WEIGHT_PICKLE_PATTERNS,
)


@dataclass(frozen=True)
class _WeightFiles:
    """The files a model folder's weights are read from, and the index's tensor-to-file map if it has one."""

    file_format: WeightFormat
    files: list[Path]
    weight_map: dict[str, str] | None = None


def index_tensors(reference: str, path: Path) -> dict[str, TensorLocation]:
    """Every tensor of a model folder as a byte range in its files; only headers (or pickle indexes) are read.

    A tensor in two files is taken from the one the index names for it; with no index, it is refused,
    because a stray old file would otherwise win or lose silently by its name's sort order.
    """
    weights = _weight_files(reference, path)
    tensors: dict[str, TensorLocation] = {}
    for file in weights.files:
        for name, location in _file_tensors(file, weights.file_format).items():
            earlier = tensors.get(name)
            tensors[name] = location if earlier is None else _one_of(reference, path, earlier, location, weights)
    return tensors


def _weight_files(reference: str, path: Path) -> _WeightFiles:
    """Safetensors files when the folder has any (they win over pickles beside them), else its pickle weights."""
    if (path / INDEX_NAME).is_file():
        return _WeightFiles("safetensors", *_shards_from_index(reference, path / INDEX_NAME))
    safetensors = _model_files(path, ("*.safetensors",))
    if safetensors:
        return _WeightFiles("safetensors", safetensors)
    if (path / PICKLE_INDEX_FILE).is_file():
        return _WeightFiles("pickle", *_shards_from_index(reference, path / PICKLE_INDEX_FILE))
    for patterns in WEIGHT_PICKLE_PATTERNS:
        pickles = _model_files(path, patterns)
        if pickles:
            return _WeightFiles("pickle", pickles)
    raise _no_weights(reference, path)


def _model_files(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    matches = {match for pattern in patterns for match in path.glob(pattern)}
    return sorted(match for match in matches if match.is_file() and not match.name.startswith(ADAPTER_WEIGHTS_PREFIX))


def _file_tensors(file: Path, file_format: WeightFormat) -> dict[str, TensorLocation]:
    if file_format == "safetensors":
        return read_header(file)
    # Imported here: only pickle-format sources need the unpickling machinery.
    from frankenmoe.io.pickles import read_pickle_index

    return read_pickle_index(file)


def _one_of(
    reference: str, path: Path, earlier: TensorLocation, later: TensorLocation, weights: _WeightFiles
) -> TensorLocation:
    """The copy of a tensor found in two files that the index names; refused when there is no such copy."""
    named = (weights.weight_map or {}).get(earlier.name)
    for location in (earlier, later):
        if named is not None and location.file == path / named:
            return location
    index = INDEX_NAME if weights.file_format == "safetensors" else PICKLE_INDEX_FILE
    why = f"{index} names neither file for it" if weights.weight_map is not None else "the folder has no index file"
    raise ModelError(
        f"Model {reference} ({path}) has tensor {earlier.name!r} in two files, {earlier.file.name} and "
        f"{later.file.name}, and {why}, so it is ambiguous which copy is the model's. One file is probably a stray "
        "or outdated copy: remove it from the folder (or add the model's index file)."
    )


def _no_weights(reference: str, path: Path) -> ModelError:
    """Why a folder without readable weights has none: an adapter, pickles that are not weights, or nothing."""
    if (path / ADAPTER_CONFIG).is_file():
        return ModelError(
            f"Model {reference} ({path}) is a PEFT adapter ({ADAPTER_CONFIG}): its files hold LoRA matrices, not a "
            "model's weights. Point source_model at the full model instead (the adapter's base model with the "
            "adapter merged into it)."
        )
    pickles = sorted({match.name for pattern in PICKLE_PATTERNS for match in path.glob(pattern)})
    if pickles:
        return ModelError(
            f"Model {reference} ({path}) has no weights frankenmoe reads, only {', '.join(pickles)}. It reads "
            f"*.safetensors files, or pickle weights named pytorch_model*.bin (with {PICKLE_INDEX_FILE} when "
            "sharded), *.pt or *.pth; other pickles hold training state or arbitrary objects and frankenmoe never "
            "unpickles them. Save the model's weights with save_pretrained, or convert them to safetensors."
        )
    return ModelError(
        f"Model {reference} ({path}) has no weights: looked for {INDEX_NAME}, *.safetensors files, "
        f"{PICKLE_INDEX_FILE} and pytorch_model*.bin, *.pt or *.pth files. Download or save the model's weights "
        "into that folder."
    )


def _shards_from_index(reference: str, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index lists, checked to exist inside its folder, and its tensor-to-shard map."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelError(
            f"Model {reference}: {index_path} is not a valid weights index (a JSON object with a weight_map)."
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
    return shards, {str(name): str(shard) for name, shard in weight_map.items()}
