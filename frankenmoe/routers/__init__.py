"""Router (gate) initialisation: one module per gate mode, each a function of a GateRequest.

Every gate function returns float32 Gates: router rows [layers, experts, hidden] and, when the
request has a shared expert, its gate rows [layers, 1, hidden]; the writer casts them to the
output dtype.
"""

from __future__ import annotations

from collections.abc import Callable

from frankenmoe.routers.cheap_embed import cheap_embed_gates
from frankenmoe.routers.fit import fit_gates
from frankenmoe.routers.hidden import hidden_gates
from frankenmoe.routers.random_init import random_gates, uniform_random_gates
from frankenmoe.routers.request import GateRequest, Gates

GATE_FUNCTIONS: dict[str, Callable[[GateRequest], Gates]] = {
    "random": random_gates,
    "uniform_random": uniform_random_gates,
    "cheap_embed": cheap_embed_gates,
    "hidden": hidden_gates,
    "fit": fit_gates,
}


def compute_gates(gate_mode: str, request: GateRequest) -> Gates:
    return GATE_FUNCTIONS[gate_mode](request)


__all__ = ["GATE_FUNCTIONS", "GateRequest", "Gates", "compute_gates"]
