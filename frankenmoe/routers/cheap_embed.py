"""Gates from the base model's token embeddings of each expert's prompts; one row set for all layers."""

from __future__ import annotations

import torch

from frankenmoe.routers.prompts import collect_expert_prompts, pool, rows_from_prompt_vectors
from frankenmoe.routers.request import GateRequest
from frankenmoe.tensor_io import read_tensor


def cheap_embed_gates(request: GateRequest) -> torch.Tensor:
    # Embeddings do not depend on position, so a lead-in (and the attention sink it moves) changes nothing here.
    prompts = collect_expert_prompts(request.base, request.experts)
    table = read_tensor(request.base.tensor("model.embed_tokens.weight"))
    vectors = [pool(table[prompt.token_ids], prompt, request.router.pooling) for prompt in prompts.prompts]
    rows = rows_from_prompt_vectors(vectors, prompts)
    # One row set serves every layer, so there is no per-layer router input to calibrate against:
    # scale auto keeps unit-norm rows (mergekit's behaviour), a number multiplies them.
    if request.router.scale is not None:
        rows = rows * request.router.scale
    return rows.unsqueeze(0).expand(request.num_layers, -1, -1).clone()
