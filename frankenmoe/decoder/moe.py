"""A layer's MLP from slices of its matrices: a dense SwiGLU MLP, or a sparse MoE one (top-k experts behind a
router, and a shared expert behind its sigmoid gate where the architecture has one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from frankenmoe.architectures.roles import MLP_PARTS
from frankenmoe.architectures.tables import OutputLayout
from frankenmoe.decoder.slices import MatrixRows, SliceCache, map_slices, slice_product, slice_starts, sliced_linear
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation


@dataclass(frozen=True)
class MLPWeights:
    """Where a SwiGLU MLP's three matrices are; `down_scale` multiplies down_proj (residual_scale)."""

    gate_proj: MatrixRows
    up_proj: MatrixRows
    down_proj: MatrixRows
    down_scale: float | None = None


def sliced_mlp(
    tokens: torch.Tensor, weights: MLPWeights, activation: nn.Module, cache: SliceCache | None = None
) -> torch.Tensor:
    """down_proj(act(gate_proj x) * up_proj x) for tokens [N, hidden], one row slice at a time."""
    device = tokens.device

    def gated(start: int) -> torch.Tensor:
        gate = activation(slice_product(tokens, weights.gate_proj, start, device, cache))
        # The up slice may be read into the buffer the gate slice was in: the gate product is made by now.
        return gate * slice_product(tokens, weights.up_proj, start, device, cache)

    intermediate = torch.cat(map_slices(gated, slice_starts(weights.gate_proj, device, cache), device), dim=-1)
    output = sliced_linear(intermediate, weights.down_proj, cache=cache)
    return output if weights.down_scale is None else output * weights.down_scale


@dataclass(frozen=True)
class SharedExpert:
    """An MLP every token goes through, its output scaled by sigmoid(tokens · gate) (Qwen2-MoE)."""

    weights: MLPWeights
    gate: torch.Tensor
    """[1, hidden] float32."""


def router_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Each token's probability for every expert: the softmax of its router logits, in float32 (what every output
    architecture computes before choosing its top-k experts, and what `route` reports)."""
    return torch.softmax(logits.float(), dim=-1)


def moe_forward(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    experts: Sequence[MLPWeights],
    top_k: int,
    activation: nn.Module,
    renormalize: bool = True,
    shared: SharedExpert | None = None,
    cache: SliceCache | None = None,
) -> torch.Tensor:
    """A sparse MoE MLP: softmax over all experts in float32, top-k (weights renormalised to 1 when
    `renormalize`), plus the shared expert behind its sigmoid gate when there is one."""
    top_weights, top_experts = router_probabilities(logits).topk(top_k, dim=-1)
    if renormalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    output = torch.zeros_like(tokens)
    if shared is not None and shared.weights.down_proj.num_rows and shared.weights.gate_proj.num_rows:
        output += torch.sigmoid(tokens @ shared.gate.T) * sliced_mlp(tokens, shared.weights, activation, cache)
    for index, weights in enumerate(experts):
        chosen = (top_experts == index).any(dim=-1).nonzero().squeeze(-1)
        if len(chosen):
            weight = (top_weights[chosen] * (top_experts[chosen] == index)).sum(dim=-1, keepdim=True)
            output[chosen] += weight * sliced_mlp(tokens[chosen], weights, activation, cache)
    return output


def expert_mlp_weights(
    layout: OutputLayout, tensors: dict[str, TensorLocation], layer: int, expert_count: int
) -> list[MLPWeights]:
    """Where each expert's gate_proj, up_proj and down_proj rows are, in a checkpoint of `layout`."""
    experts: list[dict[str, MatrixRows]] = [{} for _ in range(expert_count)]
    for tensor in layout.expert_tensors:
        for expert in range(expert_count):
            name = tensor.template.format(layer=layer, expert=expert)
            if name not in tensors:
                raise ModelError(f"The checkpoint is missing tensor {name!r} of layer {layer}.")
            location = tensors[name]
            block_rows = location.shape[-2]
            first_row = expert * block_rows if tensor.stacked else 0
            part_rows = block_rows // len(tensor.parts)
            for position, part in enumerate(tensor.parts):
                experts[expert][part] = MatrixRows(location, first_row + position * part_rows, part_rows)
    return [MLPWeights(*(parts[part] for part in MLP_PARTS)) for parts in experts]


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}
"""config `hidden_act` values and the functions transformers gives them (every family here uses silu)."""


def activation_function(name: str) -> nn.Module:
    """The MLP activation a config's `hidden_act` names."""
    if name not in ACTIVATIONS:
        raise ModelError(
            f"The config's hidden_act {name!r} is not one frankenmoe's layer-by-layer passes know "
            f"({', '.join(ACTIVATIONS)}), so they cannot run this model. Merge with gate_mode: random and "
            "--no-check, which run no forward pass."
        )
    return ACTIVATIONS[name]()
