"""Gates that ignore the prompts: seeded Gaussian rows, or nn.Linear's default uniform init."""

from __future__ import annotations

import math

import torch

from frankenmoe.routers.request import GateRequest


def random_gates(request: GateRequest) -> torch.Tensor:
    generator = torch.Generator().manual_seed(request.seed)
    return torch.randn(request.num_layers, len(request.experts), request.hidden_size, generator=generator)


def uniform_random_gates(request: GateRequest) -> torch.Tensor:
    """U(-1/sqrt(hidden), 1/sqrt(hidden)), the bound nn.Linear's kaiming-uniform init gives."""
    generator = torch.Generator().manual_seed(request.seed)
    bound = 1.0 / math.sqrt(request.hidden_size)
    shape = (request.num_layers, len(request.experts), request.hidden_size)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
