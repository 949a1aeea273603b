"""Model families and MoE output architectures as data.

A source family says where a dense decoder keeps each weight, with its shape as a function of the
model's dimensions. An output architecture says where a MoE keeps its routed experts, routers and
shared expert, which families it can hold (and why not the others), how its config.json is built
and how it routes. The plan, the writer, the streamed decoder and the read commands are generic
over these entries: adding a family or an output is an entry in the tables below plus tests. The tensor
roles and named dimensions the entries are made of are frankenmoe.architectures.roles'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from frankenmoe.architectures.roles import (
    ATTENTION_PROJECTIONS,
    DENSE_MLP,
    LAYER_NORMS,
    LAYER_PREFIX,
    MLP_PARTS,
    QK_NORMS,
    Weight,
    attention_projection_name,
)


def _attention(*extras: Weight) -> tuple[Weight, ...]:
    """A layer's weights outside the MLP, in checkpoint order: norm, attention (with `extras`), norm."""
    return (
        Weight(LAYER_NORMS[0], ("hidden",)),
        *(Weight(attention_projection_name(name), shape) for name, shape in ATTENTION_PROJECTIONS.items()),
        *extras,
        Weight(LAYER_NORMS[1], ("hidden",)),
    )


def _qkv_biases(flag: str | None = None) -> tuple[Weight, ...]:
    return (
        Weight("self_attn.q_proj.bias", ("q_width",), flag),
        Weight("self_attn.k_proj.bias", ("kv_width",), flag),
        Weight("self_attn.v_proj.bias", ("kv_width",), flag),
    )


def _qk_norms() -> tuple[Weight, ...]:
    return tuple(Weight(name, ("head_dim",)) for name in QK_NORMS)


@dataclass(frozen=True)
class SourceFamily:
    """A dense decoder family whose MLPs can become experts."""

    name: str
    model_types: tuple[str, ...]
    class_name: str
    natural_output: str
    """What `architecture: auto` picks for this family's sources when nothing else decides."""
    layer_weights: tuple[Weight, ...]
    """Every per-layer weight outside the MLP."""
    mlp: dict[str, Weight] = field(default_factory=lambda: dict(DENSE_MLP))
    derivable: tuple[str, ...] = ("self_attn.rotary_emb.inv_freq",)
    """Per-layer buffers older checkpoints carry that are recomputed from the config: skipped, documented."""

    def layer_name(self, layer: int, suffix: str) -> str:
        return LAYER_PREFIX.format(layer=layer) + suffix

    def mlp_name(self, layer: int, part: str) -> str:
        return self.layer_name(layer, self.mlp[part].name)


SOURCE_FAMILY_LIST = (
    SourceFamily(
        name="llama",
        model_types=("llama",),
        class_name="LlamaForCausalLM",
        natural_output="mixtral",
        layer_weights=_attention(
            *_qkv_biases("attention_bias"), Weight("self_attn.o_proj.bias", ("hidden",), "attention_bias")
        ),
    ),
    SourceFamily(
        name="mistral",
        model_types=("mistral",),
        class_name="MistralForCausalLM",
        natural_output="mixtral",
        layer_weights=_attention(),
    ),
    SourceFamily(
        name="qwen2",
        model_types=("qwen2",),
        class_name="Qwen2ForCausalLM",
        natural_output="qwen2_moe",
        layer_weights=_attention(*_qkv_biases()),
    ),
    SourceFamily(
        name="qwen3",
        model_types=("qwen3",),
        class_name="Qwen3ForCausalLM",
        natural_output="qwen3_moe",
        layer_weights=_attention(*_qk_norms()),
    ),
)
SOURCE_FAMILIES: dict[str, SourceFamily] = {
    model_type: family for family in SOURCE_FAMILY_LIST for model_type in family.model_types
}


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
    """Where one output architecture's routers and routed experts go, in one tensor naming."""

    name: str
    router_template: str
    expert_tensors: tuple[ExpertTensor, ...]

    def router_name(self, layer: int) -> str:
        return self.router_template.format(layer=layer)


@dataclass(frozen=True)
class SharedExpertSlots:
    """A shared expert every token goes through, scaled by sigmoid(x · gate) (Qwen2-MoE)."""

    mlp: dict[str, str]
    gate: str
    size_key: str
    """The config field giving the shared expert's intermediate size."""
    max_count: int = 1


@dataclass(frozen=True)
class Routing:
    """How router logits become expert weights: softmax over all experts in float32, then top-k.

    The top-k weights are renormalised to sum to 1 when `renormalize_key` is None (always) or when
    the config sets that key.
    """

    renormalize_key: str | None = None
    llama_cpp_renormalizes: bool = True
    """Whether llama.cpp's graph for this architecture renormalises the top-k weights: it ignores the config's
    key and hard-codes it per architecture (llama and qwen3moe do, qwen2moe does not)."""

    def renormalizes(self, config: dict[str, Any]) -> bool:
        return self.renormalize_key is None or bool(config.get(self.renormalize_key, False))


@dataclass(frozen=True)
class OutputArchitecture:
    """A MoE format frankenmoe writes and reads."""

    model_type: str
    class_name: str
    accepts: tuple[str, ...]
    """Source family names whose every weight has a place here."""
    refuses: dict[str, str]
    """Other families, each with why its weights cannot be held and what to use instead."""
    layer_weights: tuple[Weight, ...]
    """Per-layer non-MoE slots, filled from the base model."""
    zero_filled: frozenset[str]
    """Slots written as exact zeros when the base model lacks them (biases of bias-free sources)."""
    layouts: dict[str, OutputLayout]
    expert_count_key: str
    expert_size_key: str
    carried_fields: tuple[str, ...]
    """Fields copied from the base model's config.json when present."""
    carried_defaults: dict[str, Any]
    """Fields copied from the base's config.json, or given this value when it lacks them (a reader's own
    default would differ: Mixtral's config class defaults to a 4096-token sliding window in transformers 4)."""
    fixed_fields: dict[str, Any]
    routing: Routing
    shared_expert: SharedExpertSlots | None = None
    explicit_head: bool = False
    """The output always carries its own lm_head.weight (the embeddings' copy for a tied base) and says
    `tie_word_embeddings: false`: llama.cpp's qwen2moe refuses a file without an output matrix."""

    @property
    def default_layout(self) -> str:
        return next(iter(self.layouts))

    def layer_slot_names(self) -> frozenset[str]:
        return frozenset(weight.name for weight in self.layer_weights)

    def llama_cpp_mismatch(self, config: dict[str, Any]) -> str | None:
        """Why llama.cpp would compute an output with this config.json differently than transformers, or None.

        Renormalising the chosen experts' weights changes nothing when every expert is chosen (the softmax
        over all of them already sums to 1), so only `experts_per_token` < experts can differ.
        """
        used, count = config.get("num_experts_per_tok"), config.get(self.expert_count_key)
        renormalizes = self.routing.renormalizes(config)
        if renormalizes == self.routing.llama_cpp_renormalizes or used is None or count is None or used >= count:
            return None
        setting = f"{self.routing.renormalize_key}: {str(renormalizes).lower()}"
        runtime_does = "renormalises" if self.routing.llama_cpp_renormalizes else "never renormalises"
        return (
            f"llama.cpp (and so Ollama and LM Studio) {runtime_does} the weights of the {used} experts a "
            f"{self.model_type} model picks per token out of {count}, whatever its config says, while this output "
            f"({setting}) is computed the other way by transformers and vLLM: converted to GGUF it would be a "
            f"different model. To run it in llama.cpp, set `experts_per_token: {count}` (every expert, where "
            f"renormalising changes nothing)."
        )


COMMON_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
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
    "attention_dropout",
)
"""Fields every output shares with its dense sources' configs; rope settings are written separately."""

MIXTRAL_LAYOUTS = {
    "classic": OutputLayout(
        name="classic",
        router_template="model.layers.{layer}.block_sparse_moe.gate.weight",
        expert_tensors=(
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", ("gate_proj",), False),
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", ("down_proj",), False),
            ExpertTensor("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", ("up_proj",), False),
        ),
    ),
    "fused": OutputLayout(
        name="fused",
        router_template="model.layers.{layer}.mlp.gate.weight",
        expert_tensors=(
            ExpertTensor("model.layers.{layer}.mlp.experts.gate_up_proj", ("gate_proj", "up_proj"), True),
            ExpertTensor("model.layers.{layer}.mlp.experts.down_proj", ("down_proj",), True),
        ),
    ),
}


def _qwen_layout() -> dict[str, OutputLayout]:
    return {
        "classic": OutputLayout(
            name="classic",
            router_template="model.layers.{layer}.mlp.gate.weight",
            expert_tensors=tuple(
                ExpertTensor(f"model.layers.{{layer}}.mlp.experts.{{expert}}.{part}.weight", (part,), False)
                for part in MLP_PARTS
            ),
        )
    }


QWEN_MOE_FIXED_FIELDS: dict[str, Any] = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    # With every top-k weight renormalised, identical routed experts sum to exactly one expert.
    "norm_topk_prob": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
"""Every layer a MoE layer, and the routing the identity tests prove (config fields both Qwen MoEs share)."""


def _qwen_moe_entry_fields(llama_cpp_renormalizes: bool) -> dict[str, Any]:
    """What the Qwen MoE entries share: tensor names, config keys and routing."""
    return {
        "layouts": _qwen_layout(),
        "expert_count_key": "num_experts",
        "expert_size_key": "moe_intermediate_size",
        "carried_fields": (*COMMON_CONFIG_FIELDS, "sliding_window", "max_window_layers"),
        "carried_defaults": {"use_sliding_window": False},
        "routing": Routing(renormalize_key="norm_topk_prob", llama_cpp_renormalizes=llama_cpp_renormalizes),
    }


_BIASES_LOST = "its attention q/k/v biases have no place in {output}'s attention and would be lost"
_NORMS_LOST = "its attention q_norm/k_norm have no place in {output}'s attention and would be lost"
_NORMS_MISSING = "{output}'s attention applies q_norm/k_norm, which {family} models do not have"

OUTPUT_ARCHITECTURE_LIST = (
    OutputArchitecture(
        model_type="mixtral",
        class_name="MixtralForCausalLM",
        accepts=("llama", "mistral"),
        refuses={
            "qwen2": _BIASES_LOST.format(output="Mixtral") + "; use `architecture: qwen2_moe`",
            "qwen3": _NORMS_LOST.format(output="Mixtral") + "; use `architecture: qwen3_moe`",
        },
        layer_weights=_attention(),
        zero_filled=frozenset(),
        layouts=MIXTRAL_LAYOUTS,
        expert_count_key="num_local_experts",
        expert_size_key="intermediate_size",
        carried_fields=COMMON_CONFIG_FIELDS,
        carried_defaults={"sliding_window": None},
        fixed_fields={"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
        routing=Routing(),
    ),
    OutputArchitecture(
        model_type="qwen2_moe",
        class_name="Qwen2MoeForCausalLM",
        accepts=("qwen2", "llama", "mistral"),
        refuses={"qwen3": _NORMS_LOST.format(output="Qwen2-MoE") + "; use `architecture: qwen3_moe`"},
        layer_weights=_attention(*_qkv_biases()),
        zero_filled=frozenset(weight.name for weight in _qkv_biases()),
        fixed_fields={**QWEN_MOE_FIXED_FIELDS, "qkv_bias": True},
        **_qwen_moe_entry_fields(llama_cpp_renormalizes=False),
        shared_expert=SharedExpertSlots(
            mlp={part: f"model.layers.{{layer}}.mlp.shared_expert.{part}.weight" for part in MLP_PARTS},
            gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
            size_key="shared_expert_intermediate_size",
        ),
        explicit_head=True,
    ),
    OutputArchitecture(
        model_type="qwen3_moe",
        class_name="Qwen3MoeForCausalLM",
        accepts=("qwen3",),
        refuses={
            "qwen2": _BIASES_LOST.format(output="Qwen3-MoE") + "; use `architecture: qwen2_moe`",
            "llama": _NORMS_MISSING.format(output="Qwen3-MoE", family="llama")
            + "; use `architecture: mixtral` or `qwen2_moe`",
            "mistral": _NORMS_MISSING.format(output="Qwen3-MoE", family="mistral")
            + "; use `architecture: mixtral` or `qwen2_moe`",
        },
        layer_weights=_attention(*_qk_norms()),
        zero_filled=frozenset(),
        fixed_fields={**QWEN_MOE_FIXED_FIELDS, "attention_bias": False},
        **_qwen_moe_entry_fields(llama_cpp_renormalizes=True),
    ),
)
OUTPUT_ARCHITECTURES: dict[str, OutputArchitecture] = {arch.model_type: arch for arch in OUTPUT_ARCHITECTURE_LIST}
ARCHITECTURE_NAMES = ("auto", *OUTPUT_ARCHITECTURES)
LAYOUT_NAMES = tuple(dict.fromkeys(name for arch in OUTPUT_ARCHITECTURE_LIST for name in arch.layouts))

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
