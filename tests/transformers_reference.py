"""transformers' own decoder layers: the reference the streamed decoder (frankenmoe.decoder.decoder) is held to.

frankenmoe never runs these layers; the tests run them here, through transformers' public API (the
model from `from_pretrained`, its rotary embedding and its mask functions), on the same toy models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def reference_model(folder: Path) -> PreTrainedModel:
    """The model in `folder` as transformers runs it: float32, scaled dot-product attention."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


@dataclass
class ReferenceOutput:
    hidden: torch.Tensor
    """The residual stream after the layer, [1, T, hidden]."""
    router_input: torch.Tensor
    """What the layer's MLP saw (after post_attention_layernorm), [T, hidden]."""


def run_reference_layer(
    model: PreTrainedModel, layer: int, hidden: torch.Tensor, cache: Cache | None = None
) -> ReferenceOutput:
    """One sequence ([1, T, hidden]) through transformers' decoder layer `layer`, behind `cache` when given.

    The mask is the one the model's own forward would build for this layer (a sliding window where
    the config gives the layer one).
    """
    module = model.model.layers[layer]
    captured: dict[str, torch.Tensor] = {}
    hook = module.post_attention_layernorm.register_forward_hook(
        lambda _module, _inputs, output: captured.__setitem__("router_input", output)
    )
    config = model.config
    past = 0 if cache is None else cache.get_seq_length(layer)
    position_ids = torch.arange(past, past + hidden.shape[1]).unsqueeze(0)
    layer_types = getattr(config, "layer_types", None)
    sliding = (
        layer_types[layer] == "sliding_attention"
        if layer_types
        else getattr(config, "sliding_window", None) is not None
    )
    mask_function = create_sliding_window_causal_mask if sliding else create_causal_mask
    mask = mask_function(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layer,
        allow_is_causal_skip=False,
    )
    try:
        with torch.no_grad():
            output = module(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=model.model.rotary_emb(hidden, position_ids),
                cache=cache,
            )
    finally:
        hook.remove()
    return ReferenceOutput(output, captured["router_input"][0])
