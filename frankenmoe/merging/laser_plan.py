"""Laser in the plan: which matrices each `laser` block considers, and what its analysis decided for each.

The analysis itself (frankenmoe.merging.laser) reads the matrices; these are the values the plan
holds, the dry run shows and the model card records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from frankenmoe.architectures.roles import attention_projection_name
from frankenmoe.config.schema import LaserConfig, MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.sources.model import SourceModel


@dataclass(frozen=True)
class LaserTarget:
    """Marks a piece as considered by a laser block; `keep_rank` is set when the analysis reduces it."""

    group: str
    layer: int
    matrix: str
    keep_rank: int | None = None

    @property
    def reduces(self) -> bool:
        return self.keep_rank is not None


@dataclass(frozen=True)
class LaserMatrix:
    layer: int
    matrix: str
    location: TensorLocation
    layer_prefix: str

    @property
    def name_in_layer(self) -> str:
        """The weight's name inside its decoder layer, as StreamedDecoder.forward_layer's overrides expect."""
        return self.location.name.removeprefix(self.layer_prefix)


@dataclass(frozen=True)
class LaserGroup:
    """One `laser` block: its config path, settings, the model it reads and every matrix it considers."""

    path: str
    settings: LaserConfig
    source: SourceModel
    matrices: tuple[LaserMatrix, ...]

    def target(self, tensor_name: str) -> LaserTarget | None:
        for matrix in self.matrices:
            if matrix.location.name == tensor_name:
                return LaserTarget(self.path, matrix.layer, matrix.matrix)
        return None


@dataclass(frozen=True)
class LaserResult:
    """One considered matrix's decision, as the dry run and the model card show it: SNR, ranks and verdict."""

    group: str
    tensor: str
    layer: int
    matrix: str
    snr: float
    rank_before: int
    rank_after: int
    reduced: bool
    note: str


def expert_laser_groups(config: MergeConfig, experts: tuple[SourceModel, ...]) -> dict[int, LaserGroup]:
    """The laser block of every expert that has one, by expert index."""
    return {
        index: laser_group(f"experts[{index}].laser", settings.laser, experts[index])
        for index, settings in enumerate(config.experts)
        if settings.laser is not None
    }


def laser_group(path: str, settings: LaserConfig, source: SourceModel) -> LaserGroup:
    """The matrices a laser block considers in `source`; layer indices are checked here."""
    layers = resolve_layers(settings.layers, source.shape.num_hidden_layers, f"{path}.layers", source)
    if settings.calibration is not None and not Path(settings.calibration).expanduser().is_file():
        raise ConfigError(
            f"`{path}.calibration` names {settings.calibration!r}, which is not a file "
            f"(looked for {Path(settings.calibration).expanduser().resolve()}). Point it at a plain-text file, "
            "or remove the key to apply every selected reduction unchecked."
        )
    matrices = tuple(
        LaserMatrix(
            layer,
            matrix,
            source.tensor(matrix_tensor_name(source, layer, matrix)),
            source.family.layer_name(layer, ""),
        )
        for layer in layers
        for matrix in settings.matrices
    )
    return LaserGroup(path, settings, source, matrices)


def resolve_layers(spec: str | tuple[int, ...], layer_count: int, path: str, source: SourceModel) -> tuple[int, ...]:
    if spec == "all":
        return tuple(range(layer_count))
    if spec == "last_half":
        return tuple(range(layer_count // 2, layer_count))
    outside = [layer for layer in spec if layer >= layer_count]
    if outside:
        raise ConfigError(
            f"`{path}` selects layer {outside[0]}, but model {source.reference} has {layer_count} layers "
            f"(indices 0-{layer_count - 1}). Use indices in that range, `all` or `last_half`."
        )
    return tuple(spec)


def matrix_tensor_name(source: SourceModel, layer: int, matrix: str) -> str:
    if matrix in source.family.mlp:
        return source.family.mlp_name(layer, matrix)
    return source.family.layer_name(layer, attention_projection_name(matrix))


def kept_ranks(results: tuple[LaserResult, ...]) -> dict[tuple[str, int, str], int]:
    """(block path, layer, matrix) -> the rank to keep, for every reduced matrix."""
    return {(result.group, result.layer, result.matrix): result.rank_after for result in results if result.reduced}
