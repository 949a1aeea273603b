"""What every gate mode gets to work with, and what it gives back."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from frankenmoe.config.schema import ExpertConfig, RouterConfig
from frankenmoe.sources.model import SourceModel
from frankenmoe.sources.trunk import TrunkMerge


@dataclass(frozen=True)
class GateRequest:
    base: SourceModel
    experts: tuple[ExpertConfig, ...]
    router: RouterConfig
    expert_models: tuple[SourceModel, ...] = ()
    """The experts' models, in `experts` order; sequential hidden states read their MLP weights."""
    experts_per_token: int = 2
    renormalize: bool = True
    """Whether the output architecture renormalises the top-k weights (router.sequential follows it)."""
    shared_expert_slot: bool = False
    """Whether the output has a shared-expert gate to fill (with zeros when there is no shared expert)."""
    shared_expert: ExpertConfig | None = None
    shared_expert_model: SourceModel | None = None
    trunk: Mapping[str, TrunkMerge] = field(default_factory=dict)
    """The plan's merged shared tensors (`shared_weights`): the hidden-state pass runs on them, not the base's."""
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    show_progress: bool = False
    progress: GateProgress | None = field(default=None, compare=False)
    """Where a layerwise gate mode publishes each layer's rows as soon as they are final (for the
    merge's routing check, which runs behind the router computation)."""
    weight_cache_bytes: int = 0
    """Memory text generation may spend keeping the base's matrix slices between generated tokens
    (decoder.slices.SliceCache): each slice is then read once instead of once per token. 0 (the default)
    keeps the streaming bound."""
    bfloat16_generation: bool = False
    """Whether text generation (router.continuation_tokens) multiplies the base's bfloat16 matrices as
    stored, on a CPU with bfloat16 matrix units (decoder.slices.SliceCache), instead of in float32."""

    @property
    def num_layers(self) -> int:
        return self.base.shape.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.base.shape.hidden_size

    @property
    def shared_gate_from_prompts(self) -> bool:
        """The shared expert's gate row is built from its prompts only when it has some."""
        return self.shared_expert is not None and bool(self.shared_expert.positive_prompts)


@dataclass(frozen=True)
class Gates:
    """Computed rows, float32: routers [layers, experts, hidden] and, for an output with a shared
    expert, its sigmoid gates [layers, 1, hidden] (zeros when the shared expert has no prompts)."""

    router: torch.Tensor
    shared_expert_gate: torch.Tensor | None = None

    def rows(self, kind: str, layer: int) -> torch.Tensor:
        if kind == "router":
            return self.router[layer]
        if self.shared_expert_gate is None:
            raise ValueError("these gates were computed without a shared expert")
        return self.shared_expert_gate[layer]


class GateProgress:
    """The rows of the first layers a layerwise gate mode has finished, for a reader on another thread.

    `publish(layer, gates)` says that `gates`' rows of layers 0..layer (and their shared-expert gates)
    are final: the mode writes no more into them. `finished(layer)` gives those gates, or None while
    that layer's rows are still being computed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gates: Gates | None = None
        self._layers = 0

    def publish(self, layer: int, gates: Gates) -> None:
        with self._lock:
            self._gates, self._layers = gates, layer + 1

    def finished(self, layer: int) -> Gates | None:
        with self._lock:
            return self._gates if layer < self._layers else None


NEUTRAL_GATE = 1e-6
"""A shared-expert gate row with nothing to learn from is this constant, not zeros: sigmoid of its logit
is 0.5 to within 1e-6 per unit of the token's sum, and llama.cpp computes the gate's sigmoid as
silu(x) / x, which is 0 / 0 for an exactly zero logit."""
