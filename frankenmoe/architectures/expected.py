"""What a MoE checkpoint of an output architecture holds: its layout, and every tensor its config.json implies."""

from __future__ import annotations

from typing import Any

from frankenmoe.architectures.roles import (
    EMBEDDINGS,
    FINAL_NORM,
    LAYER_PREFIX,
    LM_HEAD,
    MLP_PARTS,
    dims_shape,
    named_dimensions,
)
from frankenmoe.architectures.tables import OutputArchitecture, OutputLayout
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation


def expected_tensors(
    architecture: OutputArchitecture, layout: OutputLayout, config: dict[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `architecture` with this config.json holds, with its shape (from the tables)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    expert_size = int(config[architecture.expert_size_key])
    experts = int(config[architecture.expert_count_key])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    dims = named_dimensions(hidden, expert_size, int(config["vocab_size"]), heads, kv_heads, head_dim)
    part_shapes = {
        "gate_proj": (expert_size, hidden),
        "up_proj": (expert_size, hidden),
        "down_proj": (hidden, expert_size),
    }
    expected = {EMBEDDINGS.name: (dims["vocab"], hidden), FINAL_NORM.name: (hidden,)}
    if not config.get("tie_word_embeddings"):
        expected[LM_HEAD.name] = (dims["vocab"], hidden)
    for layer in range(int(config["num_hidden_layers"])):
        prefix = LAYER_PREFIX.format(layer=layer)
        for weight in architecture.layer_weights:
            expected[prefix + weight.name] = dims_shape(weight.shape, dims)
        for tensor in layout.expert_tensors:
            rows = sum(part_shapes[part][0] for part in tensor.parts)
            columns = part_shapes[tensor.parts[0]][1]
            if tensor.stacked:
                expected[tensor.template.format(layer=layer, expert=0)] = (experts, rows, columns)
            else:
                for expert in range(experts):
                    expected[tensor.template.format(layer=layer, expert=expert)] = (rows, columns)
        expected[layout.router_name(layer)] = (experts, hidden)
        slots = architecture.shared_expert
        if slots is not None:
            shared_size = int(config[slots.size_key])
            shared_shapes = {"gate_proj": (shared_size, hidden), "up_proj": (shared_size, hidden)}
            shared_shapes["down_proj"] = (hidden, shared_size)
            for part in MLP_PARTS:
                expected[slots.mlp[part].format(layer=layer)] = shared_shapes[part]
            expected[slots.gate.format(layer=layer)] = (1, hidden)
    return expected


def detect_layout(arch: OutputArchitecture, tensors: dict[str, TensorLocation]) -> OutputLayout:
    """Which of `arch`'s tensor layouts a checkpoint uses, judged by layer 0's router name."""
    for layout in arch.layouts.values():
        if layout.router_name(0) in tensors:
            return layout
    raise ModelError(
        f"The checkpoint has no {arch.model_type} router tensor for layer 0 in any known layout "
        f"({', '.join(layout.router_name(0) for layout in arch.layouts.values())}); it is not a {arch.model_type} MoE."
    )


def active_parameters(total: int, per_expert: int, experts: int, experts_per_token: int) -> int:
    """Parameters one token passes through: all of them but the MLPs of the experts its router does not choose."""
    return total - (experts - experts_per_token) * per_expert
