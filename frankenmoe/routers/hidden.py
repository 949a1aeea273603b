"""Gates from each layer's hidden states of the expert prompts, computed one decoder layer at a time.

`layerwise_gates` runs every prompt through the base model's layers in order. At each layer it
stops after attention to capture two views of the prompts (the router input, i.e. the output of
post_attention_layernorm, and the residual stream entering the layer), asks a row function for
that layer's gate rows, scales them (see prompts.scale_rows), and only then finishes the layer:
with the base model's dense MLP, or, with `router.sequential`, with the MoE MLP the merged model
will have there (the experts' MLPs behind the rows just computed). Sequential states are what the
merged model itself sees at inference; the base model's states drift from them layer by layer
once the experts differ. Only one layer's weights are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers.activations import ACT2FN

from frankenmoe.architectures import MLP_PARTS
from frankenmoe.layers import MatrixRows, MLPWeights, StreamedDecoder, add_mlp_outputs, moe_forward
from frankenmoe.routers.prompts import (
    ExpertPrompts,
    collect_expert_prompts,
    content_tokens,
    pool,
    rows_from_prompt_vectors,
    scale_rows,
    with_continuations,
)
from frankenmoe.routers.request import GateRequest


@dataclass(frozen=True)
class LayerStates:
    """Every prompt's states at one layer, each [tokens, hidden] float32."""

    layer: int
    router_inputs: list[torch.Tensor]
    residual_inputs: list[torch.Tensor]

    def selected(self, input_name: str) -> list[torch.Tensor]:
        return self.residual_inputs if input_name == "residual" else self.router_inputs


RowFunction = Callable[[LayerStates, ExpertPrompts, GateRequest], torch.Tensor]
"""Unscaled gate rows [experts, hidden] of one layer from that layer's prompt states."""


def hidden_gates(request: GateRequest) -> torch.Tensor:
    return layerwise_gates(request, hidden_rows)


def hidden_rows(states: LayerStates, prompts: ExpertPrompts, request: GateRequest) -> torch.Tensor:
    inputs = states.selected(request.router.input)
    vectors = [
        pool(state, prompt, request.router.pooling) for state, prompt in zip(inputs, prompts.prompts, strict=True)
    ]
    common = content_tokens(inputs, prompts).mean(dim=0) if request.router.center else None
    return rows_from_prompt_vectors(vectors, prompts, common)


def layerwise_gates(request: GateRequest, rows_for_layer: RowFunction) -> torch.Tensor:
    prompts = collect_expert_prompts(request.base, request.experts, request.router.lead_in)
    decoder = StreamedDecoder(request.base.config, request.base.tensors, request.device)
    if request.router.continuation_tokens:
        prompts = with_continuations(
            prompts, request.base, decoder, request.router.continuation_tokens, request.show_progress
        )
    gates = torch.empty(request.num_layers, len(request.experts), request.hidden_size)
    hidden = [decoder.embed(prompt.token_ids) for prompt in prompts.prompts]
    layers = tqdm(range(request.num_layers), desc="hidden-state pass", unit="layer", disable=not request.show_progress)
    for layer in layers:
        outputs = decoder.attend(layer, hidden)
        router_inputs = [output.router_input for output in outputs]
        states = LayerStates(layer, router_inputs, [state[0] for state in hidden])
        rows = rows_for_layer(states, prompts, request).float()
        gates[layer] = scale_rows(rows, content_tokens(router_inputs, prompts), request.router)
        if layer + 1 == request.num_layers:
            break
        all_tokens = torch.cat(router_inputs)
        with torch.no_grad():
            if request.router.sequential:
                mlp_outputs = merged_moe_mlp(request, layer, gates[layer], all_tokens)
            else:
                mlp_outputs = decoder.dense_mlp(layer, all_tokens)
        hidden = add_mlp_outputs(outputs, mlp_outputs)
    return gates


def merged_moe_mlp(request: GateRequest, layer: int, gate_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The merged model's MoE MLP of `layer` on `tokens`: Mixtral routing over the experts' own MLPs.

    residual_scale applies to down_proj as in the written checkpoint; noise_scale is left out, its
    seeded noise being small by design.
    """
    if len(request.expert_models) != len(request.experts):
        raise ValueError("router.sequential needs GateRequest.expert_models, one per expert")
    experts = [
        MLPWeights(
            *(MatrixRows.whole(model.tensor(model.family.mlp_name(layer, part))) for part in MLP_PARTS),
            down_scale=settings.residual_scale,
        )
        for model, settings in zip(request.expert_models, request.experts, strict=True)
    ]
    logits = tokens @ gate_rows.to(tokens.device).T
    activation = ACT2FN[request.base.shape.hidden_act]
    return moe_forward(tokens, logits, experts, request.experts_per_token, activation)
