"""Router (gate) initialisation: one module per gate mode, each a function of a GateRequest.

Every gate function returns float32 rows shaped [layers, experts, hidden]; the writer casts them
to the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from frankenmoe.routers.cheap_embed import cheap_embed_gates
from frankenmoe.routers.fit import fit_gates
from frankenmoe.routers.hidden import hidden_gates
from frankenmoe.routers.random_init import random_gates, uniform_random_gates
from frankenmoe.routers.request import GateRequest

GATE_FUNCTIONS: dict[str, Callable[[GateRequest], torch.Tensor]] = {
    "random": random_gates,
    "uniform_random": uniform_random_gates,
    "cheap_embed": cheap_embed_gates,
    "hidden": hidden_gates,
    "fit": fit_gates,
}


def compute_gates(gate_mode: str, request: GateRequest) -> torch.Tensor:
    return GATE_FUNCTIONS[gate_mode](request)


__all__ = ["GATE_FUNCTIONS", "GateRequest", "compute_gates"]
