"""One layer's self-attention, computed from the table's weights in float32 the way transformers'
decoder layers compute it at inference (RMS norms, q/k norms where a family has them, rotary
embedding as the config resolves it, grouped-query scaled dot-product attention, the sliding window
in the mask); the tests hold it to transformers' own layer for every family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from frankenmoe.architectures.roles import LAYER_NORMS, QK_NORMS
from frankenmoe.decoder.slices import MatrixRows, SliceCache, sliced_linear
from frankenmoe.runtime.compat import rope_frequencies

if TYPE_CHECKING:  # transformers is slow to import: a merge that runs no decoder never imports it
    from transformers import PretrainedConfig


@dataclass
class LayerOutputs:
    """What one loaded layer did to one sequence, and the input its router (or MLP) saw."""

    hidden: torch.Tensor
    router_input: torch.Tensor


@dataclass
class LoadedAttention:
    """One layer's attention: its norms (the layer's two, and q/k norms where the family has them) in
    float32, and where its projection matrices and their biases are."""

    norms: dict[str, torch.Tensor]
    projections: dict[str, MatrixRows]
    biases: dict[str, torch.Tensor]
    cache: SliceCache | None = None

    def project(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """Projection `name` (q_proj, k_proj, v_proj, o_proj) of tokens [N, in], as nn.Linear computes it."""
        return sliced_linear(tokens, self.projections[name], self.biases.get(name), self.cache)


def rotary_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] and the scale of its cos and sin, from the config as
    transformers resolves it (rope scaling of every kind included)."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "default":
        theta = float(parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    inverse_frequencies, scaling = rope_frequencies(config, rope_type)
    return inverse_frequencies.float(), scaling


class KeyValueCache:
    """One sequence's keys (rotary embedding applied) and values in every layer, for the tokens seen so far."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def length(self, layer: int) -> int:
        held = self._layers.get(layer)
        return 0 if held is None else held[0].shape[-2]

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens' keys and values ([1, kv_heads, T, head_dim]); the layer's keys and values so far."""
        held = self._layers.get(layer)
        if held is not None:
            keys, values = torch.cat((held[0], keys), dim=-2), torch.cat((held[1], values), dim=-2)
        self._layers[layer] = (keys, values)
        return keys, values


class SelfAttention:
    """A config's attention arithmetic, the same in every layer but for the sliding window: head counts and size,
    the norms' epsilon, the rotary embedding, the causal mask."""

    def __init__(self, config: PretrainedConfig, device: torch.device) -> None:
        self.hf_config = config
        self.device = device
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        inverse_frequencies, self.rotary_scaling = rotary_frequencies(config, self.head_dim)
        self.inverse_frequencies = inverse_frequencies.to(device)

    def run(
        self,
        layer: int,
        attention: LoadedAttention,
        hidden: list[torch.Tensor],
        caches: Sequence[KeyValueCache] | None = None,
    ) -> list[LayerOutputs]:
        """Every sequence ([1, T, hidden] each) through layer `layer`'s `attention`: the residual stream after it,
        and the MLP's input (with `caches`, as `StreamedDecoder.attend` says)."""
        per_sequence = caches if caches is not None else [None] * len(hidden)
        lengths = [state.shape[1] for state in hidden]
        with torch.no_grad():
            residual = torch.cat([state[0] for state in hidden])
            normed = self.rms_norm(residual, attention.norms[LAYER_NORMS[0]])
            q, k, v = (attention.project(name, normed) for name in ("q_proj", "k_proj", "v_proj"))
            groups = self.heads // self.kv_heads
            attended = []
            offset = 0
            for cache, length in zip(per_sequence, lengths, strict=True):
                rows = slice(offset, offset + length)
                offset += length
                past = 0 if cache is None else cache.length(layer)
                query = self._heads_of(q[rows], self.heads, attention.norms.get(QK_NORMS[0]))
                key = self._heads_of(k[rows], self.kv_heads, attention.norms.get(QK_NORMS[1]))
                value = self._heads_of(v[rows], self.kv_heads)
                query, key = self._rotate(query, key, torch.arange(past, past + length, device=self.device))
                if cache is not None:
                    key, value = cache.extend(layer, key, value)
                output = nn.functional.scaled_dot_product_attention(
                    query,
                    key.repeat_interleave(groups, dim=1),
                    value.repeat_interleave(groups, dim=1),
                    attn_mask=self._causal_mask(layer, length, past),
                    scale=self.head_dim**-0.5,
                )
                attended.append(output[0].transpose(0, 1).reshape(length, self.heads * self.head_dim))
            after = residual + attention.project("o_proj", torch.cat(attended))
            router_inputs = self.rms_norm(after, attention.norms[LAYER_NORMS[1]])
        return [
            LayerOutputs(state.unsqueeze(0), router_input)
            for state, router_input in zip(after.split(lengths), router_inputs.split(lengths), strict=True)
        ]

    def rms_norm(self, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm with the config's epsilon, which every norm of the model uses."""
        variance = tokens.pow(2).mean(-1, keepdim=True)
        return weight * (tokens * torch.rsqrt(variance + self.eps))

    def _heads_of(self, projected: torch.Tensor, heads: int, norm: torch.Tensor | None = None) -> torch.Tensor:
        """[T, heads * head_dim] -> [1, heads, T, head_dim], each head RMS-normed first where the family does."""
        split = projected.view(len(projected), heads, self.head_dim)
        if norm is not None:
            split = self.rms_norm(split, norm)
        return split.transpose(0, 1).unsqueeze(0)

    def _rotate(
        self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding of queries and keys [1, heads, T, head_dim] at `positions`."""
        angles = positions[:, None].float() * self.inverse_frequencies[None, :]
        both = torch.cat((angles, angles), dim=-1)
        cos, sin = both.cos() * self.rotary_scaling, both.sin() * self.rotary_scaling

        def rotated(states: torch.Tensor) -> torch.Tensor:
            first, second = states.chunk(2, dim=-1)
            return states * cos + torch.cat((-second, first), dim=-1) * sin

        return rotated(query), rotated(key)

    def _causal_mask(self, layer: int, length: int, past: int = 0) -> torch.Tensor:
        """Additive mask of `length` new tokens over themselves and the `past` tokens before them.

        The sliding window is the one transformers' config resolves for this layer (Qwen configs carry
        a window that applies only with use_sliding_window, and only to some layers).
        """
        queries = torch.arange(past, past + length, device=self.device)
        keys = torch.arange(past + length, device=self.device)
        allowed = keys[None, :] <= queries[:, None]
        window = getattr(self.hf_config, "sliding_window", None)
        layer_types = getattr(self.hf_config, "layer_types", None)
        if layer_types and layer_types[layer] != "sliding_attention":
            window = None
        if window:
            allowed &= keys[None, :] > queries[:, None] - int(window)
        mask = torch.zeros(length, past + length, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return mask[None, None]
