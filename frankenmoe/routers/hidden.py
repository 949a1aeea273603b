"""Gates from each layer's hidden states of the expert prompts, computed one decoder layer at a time.

`layerwise_gates` runs every prompt through the base model's layers in order. At each layer it
stops after attention to capture two views of the prompts (the router input, i.e. the output of
post_attention_layernorm, and the residual stream entering the layer), asks a row function for
that layer's gate rows, scales them (see prompts.row_scale), and only then finishes the layer:
with the base model's dense MLP, or, with `router.sequential`, with the MoE MLP the merged model
will have there (the experts' MLPs behind the rows just computed). Sequential states are what the
merged model itself sees at inference; the base model's states drift from them layer by layer
once the experts differ. Only one layer's weights are in memory at a time.

A shared expert with prompts gets its sigmoid gate row the same way: its prompts join the pass, and
its row is the one the row function gives it as one more expert, scaled like the routed rows. The
routed rows are computed from the routed experts' prompts alone, so they are the same with or
without a shared expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from frankenmoe.architectures.roles import MLP_PARTS
from frankenmoe.decoder.decoder import StreamedDecoder, add_mlp_outputs
from frankenmoe.decoder.moe import MLPWeights, SharedExpert, activation_function, moe_forward
from frankenmoe.decoder.slices import MatrixRows, SliceCache
from frankenmoe.routers.prompts import (
    ExpertPrompts,
    collect_expert_prompts,
    content_tokens,
    pool,
    row_scale,
    rows_from_prompt_vectors,
    with_continuations,
)
from frankenmoe.routers.random_init import neutral_shared_gates
from frankenmoe.routers.request import GateRequest, Gates
from frankenmoe.sources.model import SourceModel


@dataclass(frozen=True)
class LayerStates:
    """Every prompt's states at one layer, each [tokens, hidden] float32."""

    layer: int
    router_inputs: list[torch.Tensor]
    residual_inputs: list[torch.Tensor]

    def selected(self, input_name: str) -> list[torch.Tensor]:
        return self.residual_inputs if input_name == "residual" else self.router_inputs

    def first(self, count: int) -> LayerStates:
        """The states of the first `count` prompts only."""
        return LayerStates(self.layer, self.router_inputs[:count], self.residual_inputs[:count])


RowFunction = Callable[[LayerStates, ExpertPrompts, GateRequest], torch.Tensor]
"""Unscaled gate rows [experts, hidden] of one layer from that layer's prompt states."""


def hidden_gates(request: GateRequest) -> Gates:
    return layerwise_gates(request, hidden_rows)


def hidden_rows(states: LayerStates, prompts: ExpertPrompts, request: GateRequest) -> torch.Tensor:
    inputs = states.selected(request.router.input)
    vectors = [
        pool(state, prompt, request.router.pooling) for state, prompt in zip(inputs, prompts.prompts, strict=True)
    ]
    common = content_tokens(inputs, prompts).mean(dim=0) if request.router.center else None
    return rows_from_prompt_vectors(vectors, prompts, common)


def layerwise_gates(request: GateRequest, rows_for_layer: RowFunction) -> Gates:
    shared = (request.shared_expert,) if request.shared_gate_from_prompts and request.shared_expert else ()
    prompts = collect_expert_prompts(request.base, (*request.experts, *shared), request.router.lead_in)
    decoder = StreamedDecoder(
        request.base.config, request.base.tensors, request.device, merged=request.trunk, read_ahead=True
    )
    if request.router.continuation_tokens:
        # Generation streams the whole base once per token, so it alone keeps slices (--weight-cache)
        # and may multiply in bfloat16; the states the rows are fitted on are computed in float32.
        writer = replace(
            decoder,
            slice_cache=SliceCache(request.weight_cache_bytes, native_bfloat16=request.bfloat16_generation),
        )
        prompts = with_continuations(
            prompts, request.base, writer, request.router.continuation_tokens, request.show_progress
        )
    expert_count = len(request.experts)
    routed = routed_prompts(prompts, expert_count)
    gates = torch.empty(request.num_layers, expert_count, request.hidden_size)
    shared_gates = neutral_shared_gates(request)
    hidden = [decoder.embed(prompt.token_ids) for prompt in prompts.prompts]
    layers = tqdm(range(request.num_layers), desc="hidden-state pass", unit="layer", disable=not request.show_progress)
    for layer in layers:
        outputs = decoder.attend(layer, hidden)
        router_inputs = [output.router_input for output in outputs]
        states = LayerStates(layer, router_inputs, [state[0] for state in hidden])
        routed_states = states.first(len(routed.prompts))
        rows = rows_for_layer(routed_states, routed, request).float()
        scale = row_scale(rows, content_tokens(routed_states.router_inputs, routed), request.router)
        gates[layer] = rows * scale
        if shared and shared_gates is not None:
            shared_gates[layer] = rows_for_layer(states, prompts, request).float()[expert_count:] * scale
        if request.progress is not None:
            request.progress.publish(layer, Gates(gates, shared_gates))
        if layer + 1 == request.num_layers:
            break
        all_tokens = torch.cat(router_inputs)
        with torch.no_grad():
            if request.router.sequential:
                shared_row = None if shared_gates is None else shared_gates[layer]
                mlp_outputs = merged_moe_mlp(request, layer, gates[layer], all_tokens, shared_row)
            else:
                mlp_outputs = decoder.dense_mlp(layer, all_tokens)
        hidden = add_mlp_outputs(outputs, mlp_outputs)
    return Gates(gates, shared_gates)


def routed_prompts(prompts: ExpertPrompts, expert_count: int) -> ExpertPrompts:
    """The routed experts' prompts alone: they come first, any shared expert's last."""
    kept = range(expert_count)
    indices = [index for expert in kept for index in (*prompts.positive[expert], *prompts.negative[expert])]
    count = max(indices, default=-1) + 1
    return ExpertPrompts(prompts.prompts[:count], prompts.positive[:expert_count], prompts.negative[:expert_count])


def merged_moe_mlp(
    request: GateRequest,
    layer: int,
    gate_rows: torch.Tensor,
    tokens: torch.Tensor,
    shared_gate_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged model's MoE MLP of `layer` on `tokens`: the output architecture's routing over the
    experts' own MLPs, plus the shared expert behind `shared_gate_row` when there is one.

    residual_scale applies to down_proj as in the written checkpoint; noise_scale is left out, its
    seeded noise being small by design.
    """
    if not request.expert_models:
        raise ValueError("router.sequential needs GateRequest.expert_models, one per expert")
    experts = [
        _mlp_weights(model, layer, settings.residual_scale)
        for model, settings in zip(request.expert_models, request.experts, strict=True)
    ]
    shared = None
    if request.shared_expert_model is not None and request.shared_expert is not None and shared_gate_row is not None:
        weights = _mlp_weights(request.shared_expert_model, layer, request.shared_expert.residual_scale)
        shared = SharedExpert(weights, shared_gate_row.to(tokens.device))
    logits = tokens @ gate_rows.to(tokens.device).T
    activation = activation_function(request.base.shape.hidden_act)
    return moe_forward(tokens, logits, experts, request.experts_per_token, activation, request.renormalize, shared)


def _mlp_weights(model: SourceModel, layer: int, down_scale: float | None) -> MLPWeights:
    """An expert's MLP matrices of `layer`, with its LoRA adapter's deltas when it has one."""
    names = [model.family.mlp_name(layer, part) for part in MLP_PARTS]
    return MLPWeights(
        *(MatrixRows.whole(model.tensor(name), model.lora_delta(name)) for name in names), down_scale=down_scale
    )
