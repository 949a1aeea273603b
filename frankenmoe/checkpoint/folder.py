"""Opening a MoE checkpoint folder: its config, architecture, tensor layout and tensor index (nothing loaded)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.expected import detect_layout
from frankenmoe.architectures.tables import OUTPUT_ARCHITECTURES, OutputArchitecture, OutputLayout
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.sources.model import read_model_config
from frankenmoe.sources.weights import index_tensors


@dataclass(frozen=True)
class Checkpoint:
    """A MoE model folder: its config, architecture, tensor layout and tensor index (nothing loaded)."""

    path: Path
    config: dict[str, Any]
    tensors: Mapping[str, TensorLocation]
    architecture: OutputArchitecture
    layout: OutputLayout

    @property
    def num_experts(self) -> int:
        return int(self.config[self.architecture.expert_count_key])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise ModelError(f"Checkpoint folder {path} does not exist. Pass the folder a merge wrote.")
    config = read_model_config(str(path), path)
    architecture = OUTPUT_ARCHITECTURES.get(str(config.get("model_type")))
    if architecture is None or not config.get(architecture.expert_count_key):
        expected = ", ".join(
            f"{arch.model_type} with {arch.expert_count_key}" for arch in OUTPUT_ARCHITECTURES.values()
        )
        raise ModelError(
            f"{path} holds a {config.get('model_type')!r} model, not a MoE frankenmoe can read "
            f"(config.json needs one of: {expected})."
        )
    tensors = index_tensors(str(path), path)
    return Checkpoint(path, config, tensors, architecture, detect_layout(architecture, tensors))
