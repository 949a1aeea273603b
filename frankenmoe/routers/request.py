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
    expert_models: tuple[SourceModel, ...] = ()
    """The experts' models, in `experts` order; sequential hidden states read their MLP weights."""
    experts_per_token: int = 2
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    show_progress: bool = False

    @property
    def num_layers(self) -> int:
        return self.base.shape.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.base.shape.hidden_size
