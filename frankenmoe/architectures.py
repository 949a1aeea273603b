"""Tensor naming as data: where source families keep their tensors, where output layouts put them.

Adding a source family or an output layout means adding an entry to one of the tables below.
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SourceFamily:
    """A dense decoder family whose MLPs can become experts."""

    model_types: tuple[str, ...]
    global_tensors: tuple[str, ...]
    untied_lm_head: str
    layer_tensors: tuple[str, ...]
    mlp_tensors: dict[str, str]
    layer_template: str = "model.layers.{layer}."

    def layer_name(self, layer: int, suffix: str) -> str:
        return self.layer_template.format(layer=layer) + suffix

    def mlp_name(self, layer: int, part: str) -> str:
        return self.layer_name(layer, self.mlp_tensors[part])


LLAMA_LIKE = SourceFamily(
    model_types=("llama", "mistral"),
    global_tensors=("model.embed_tokens.weight", "model.norm.weight"),
    untied_lm_head="lm_head.weight",
    layer_tensors=(
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
    ),
    mlp_tensors={
        "gate_proj": "mlp.gate_proj.weight",
        "up_proj": "mlp.up_proj.weight",
        "down_proj": "mlp.down_proj.weight",
    },
)

SOURCE_FAMILIES: dict[str, SourceFamily] = {model_type: LLAMA_LIKE for model_type in LLAMA_LIKE.model_types}


@dataclass(frozen=True)
class ExpertTensor:
    """One output tensor kind: its name template and which source MLP parts fill it.

    A per-expert tensor holds `parts` of one expert; a stacked tensor holds `parts` of every
    expert in expert order, each expert's parts concatenated along the first dimension.
    """

    template: str
    parts: tuple[str, ...]
    stacked: bool


@dataclass(frozen=True)
class OutputLayout:
    name: str
    description: str
    router_template: str
    expert_tensors: tuple[ExpertTensor, ...]

    def router_name(self, layer: int) -> str:
        return self.router_template.format(layer=layer)


OUTPUT_LAYOUTS: dict[str, OutputLayout] = {
    "classic": OutputLayout(
        name="classic",
        description="block_sparse_moe.experts.E.w1/w2/w3 (transformers 4.x/5.x, vLLM, llama.cpp)",
        router_template="model.layers.{layer}.block_sparse_moe.gate.weight",
        expert_tensors=(
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", ("gate_proj",), False),
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", ("down_proj",), False),
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", ("up_proj",), False),
        ),
    ),
    "fused": OutputLayout(
        name="fused",
        description="mlp.experts.gate_up_proj / down_proj (transformers 5.x only)",
        router_template="model.layers.{layer}.mlp.gate.weight",
        expert_tensors=(
            ExpertTensor("model.layers.{layer}.mlp.experts.gate_up_proj", ("gate_proj", "up_proj"), True),
            ExpertTensor("model.layers.{layer}.mlp.experts.down_proj", ("down_proj",), True),
        ),
    ),
}

MIXTRAL_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "attention_dropout",
)
"""Fields a Mixtral config shares with a Llama/Mistral config, carried over from the base."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
"""Files copied unchanged from the base model folder when present."""
