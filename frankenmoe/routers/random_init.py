"""Gates that ignore the prompts: seeded Gaussian rows, or nn.Linear's default uniform init.

A shared expert's gate is the neutral constant here (sigmoid 0.5 on every token): these modes use no prompts.
"""

from __future__ import annotations

import math

import torch

from frankenmoe.routers.request import NEUTRAL_GATE, GateRequest, Gates


def random_gates(request: GateRequest) -> Gates:
    generator = torch.Generator().manual_seed(request.seed)
    rows = torch.randn(request.num_layers, len(request.experts), request.hidden_size, generator=generator)
    return Gates(rows, neutral_shared_gates(request))


def uniform_random_gates(request: GateRequest) -> Gates:
    """U(-1/sqrt(hidden), 1/sqrt(hidden)), the bound nn.Linear's kaiming-uniform init gives."""
    generator = torch.Generator().manual_seed(request.seed)
    bound = 1.0 / math.sqrt(request.hidden_size)
    shape = (request.num_layers, len(request.experts), request.hidden_size)
    return Gates((torch.rand(shape, generator=generator) * 2 - 1) * bound, neutral_shared_gates(request))


def neutral_shared_gates(request: GateRequest) -> torch.Tensor | None:
    """Shared-expert gate rows with nothing to learn from (NEUTRAL_GATE), or None without a slot."""
    if not request.shared_expert_slot:
        return None
    return torch.full((request.num_layers, 1, request.hidden_size), NEUTRAL_GATE)
