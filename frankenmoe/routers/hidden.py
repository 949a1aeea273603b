"""Gates from each layer's true router input: the output of post_attention_layernorm.

The base model runs one decoder layer at a time over every prompt (see layers.py); for each layer
each prompt's router-input states are pooled to one vector and turned into rows.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from frankenmoe.layers import StreamedDecoder, router_inputs_by_layer
from frankenmoe.routers.prompts import collect_expert_prompts, pool, rows_from_prompt_vectors
from frankenmoe.routers.request import GateRequest


def hidden_gates(request: GateRequest) -> torch.Tensor:
    prompts = collect_expert_prompts(request.base, request.experts)
    decoder = StreamedDecoder(request.base.config, request.base.tensors, request.device)
    layers = tqdm(range(request.num_layers), desc="hidden-state pass", unit="layer", disable=not request.show_progress)
    gates = torch.empty(request.num_layers, len(request.experts), request.hidden_size)
    sequences = [prompt.token_ids for prompt in prompts.prompts]
    for layer, router_inputs in router_inputs_by_layer(decoder, sequences, layers):
        vectors = [
            pool(states, prompt, request.router.pooling)
            for states, prompt in zip(router_inputs, prompts.prompts, strict=True)
        ]
        gates[layer] = rows_from_prompt_vectors(vectors, prompts, request.router)
    return gates
