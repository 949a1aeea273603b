"""Tensor roles and named dimensions: what every decoder family calls its embeddings, norms, attention
and MLP weights, and a weight's shape as names of the model's dimensions (resolved per model in
frankenmoe.sources). The family and output tables (frankenmoe.architectures.tables) are built from these.
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
LAYER_PREFIX = "model.layers.{layer}."

Dims = tuple[str, ...]
"""A shape as names of model dimensions: hidden, intermediate, vocab, q_width, kv_width, head_dim."""


@dataclass(frozen=True)
class Weight:
    """One tensor: its name (relative to the layer prefix for per-layer weights) and its shape.

    A weight with a `flag` exists exactly when the model's config.json sets that flag (Llama's
    `attention_bias`); one without is always there.
    """

    name: str
    shape: Dims
    flag: str | None = None


ATTENTION_PROJECTIONS: dict[str, Dims] = {
    "q_proj": ("q_width", "hidden"),
    "k_proj": ("kv_width", "hidden"),
    "v_proj": ("kv_width", "hidden"),
    "o_proj": ("hidden", "q_width"),
}
"""Every family's attention matrices (what `base_laser` can reduce), at self_attn.NAME.weight."""


def attention_projection_name(projection: str) -> str:
    return f"self_attn.{projection}.weight"


LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
"""A decoder layer's RMS norms: before its attention, and before its MLP (the router's input)."""
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
"""Per-head RMS norms of queries and keys, before the rotary embedding (Qwen3)."""


DENSE_MLP = {
    "gate_proj": Weight("mlp.gate_proj.weight", ("intermediate", "hidden")),
    "up_proj": Weight("mlp.up_proj.weight", ("intermediate", "hidden")),
    "down_proj": Weight("mlp.down_proj.weight", ("hidden", "intermediate")),
}
EMBEDDINGS = Weight("model.embed_tokens.weight", ("vocab", "hidden"))
FINAL_NORM = Weight("model.norm.weight", ("hidden",))
LM_HEAD = Weight("lm_head.weight", ("vocab", "hidden"))
"""Absent when the config ties the head to the embeddings."""


def named_dimensions(
    hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int, head_dim: int
) -> dict[str, int]:
    """The values of the named dimensions (`Dims`) the tables' shapes are written in."""
    return {
        "hidden": hidden,
        "intermediate": intermediate,
        "vocab": vocab,
        "head_dim": head_dim,
        "q_width": heads * head_dim,
        "kv_width": kv_heads * head_dim,
    }


def dims_shape(shape: Dims, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[name] for name in shape)
