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

    def __post_init__(self) -> None:
        # The experts' settings and models are parallel: a mismatch is a caller's bug, refused when the request is
        # made rather than in the middle of a router computation.
        if self.expert_models and len(self.expert_models) != len(self.experts):
            raise ValueError(f"{len(self.expert_models)} expert models for {len(self.experts)} experts")
        if self.shared_expert_model is not None and self.shared_expert is None:
            raise ValueError("a shared expert model without the shared expert's settings")

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
    are final: the mode writes no more into them. `wait_for(layer)` blocks until they are, or until the
    computation ends (`close`, finished or failed) without publishing them.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._gates: Gates | None = None
        self._layers = 0
        self._closed = False

    def publish(self, layer: int, gates: Gates) -> None:
        with self._changed:
            self._gates, self._layers = gates, layer + 1
            self._changed.notify_all()

    def close(self) -> None:
        """The computation has ended: readers stop waiting for rows it did not publish."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(self, layer: int) -> Gates | None:
        """The gates once `layer`'s rows are final; None when the computation ended without publishing them
        (a mode that is not layerwise, or one that failed: its result says which)."""
        with self._changed:
            self._changed.wait_for(lambda: layer < self._layers or self._closed)
            return self._gates if layer < self._layers else None


NEUTRAL_GATE = 1e-6
"""A shared-expert gate row with nothing to learn from is this constant, not zeros: sigmoid of its logit
is 0.5 to within 1e-6 per unit of the token's sum, and llama.cpp computes the gate's sigmoid as
silu(x) / x, which is 0 / 0 for an exactly zero logit."""
