"""What every gate mode gets to work with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from frankenmoe.config import ExpertConfig, RouterConfig
from frankenmoe.sources import SourceModel


@dataclass(frozen=True)
class GateRequest:
    base: SourceModel
    experts: tuple[ExpertConfig, ...]
    router: RouterConfig
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    show_progress: bool = False

    @property
    def num_layers(self) -> int:
        return self.base.shape.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.base.shape.hidden_size
