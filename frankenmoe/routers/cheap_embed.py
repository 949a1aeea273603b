"""Gates from the base model's token embeddings of each expert's prompts; one row set for all layers."""

from __future__ import annotations

from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.routers.prompts import collect_expert_prompts, pool, rows_from_prompt_vectors
from frankenmoe.routers.random_init import neutral_shared_gates
from frankenmoe.routers.request import GateRequest, Gates


def cheap_embed_gates(request: GateRequest) -> Gates:
    # Embeddings do not depend on position, so a lead-in (and the attention sink it moves) changes nothing here.
    shared = (request.shared_expert,) if request.shared_gate_from_prompts and request.shared_expert else ()
    prompts = collect_expert_prompts(request.base, (*request.experts, *shared))
    decoder = StreamedDecoder(request.base.config, request.base.tensors, merged=request.trunk)
    vectors = [pool(decoder.embed(prompt.token_ids)[0], prompt, request.router.pooling) for prompt in prompts.prompts]
    # Each row depends on its own expert's prompts only, so the shared expert's row can be built alongside.
    rows = rows_from_prompt_vectors(vectors, prompts)
    # One row set serves every layer, so there is no per-layer router input to calibrate against:
    # scale auto keeps unit-norm rows (mergekit's behaviour), a number multiplies them.
    if request.router.scale is not None:
        rows = rows * request.router.scale
    per_layer = rows.unsqueeze(0).expand(request.num_layers, -1, -1).clone()
    expert_count = len(request.experts)
    shared_rows = per_layer[:, expert_count:].clone() if shared else neutral_shared_gates(request)
    return Gates(per_layer[:, :expert_count].clone(), shared_rows)
