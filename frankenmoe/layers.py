"""Run a decoder one layer at a time from streamed weights, so no pass holds a whole model.

Each layer is a transformers decoder-layer module built on the meta device and filled with that
layer's tensors (in float32), so the maths is exactly what transformers computes at inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from frankenmoe.architectures import MLP_PARTS, OUTPUT_LAYOUTS, SOURCE_FAMILIES, OutputLayout
from frankenmoe.errors import ModelError
from frankenmoe.tensor_io import TensorLocation, read_rows, read_tensor

DECODER_MODULES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "llama": (LlamaDecoderLayer, LlamaRotaryEmbedding),
    "mistral": (MistralDecoderLayer, MistralRotaryEmbedding),
    "mixtral": (MixtralDecoderLayer, MixtralRotaryEmbedding),
}
MLP_ROWS_PER_SLICE = 1024
"""Rows of an MLP matrix converted to float32 at a time by `StreamedDecoder.dense_mlp`."""
MODULE_LAYOUT = OUTPUT_LAYOUTS["fused"]
"""transformers 5's Mixtral modules name their expert parameters as the fused layout does."""


@dataclass
class LayerOutputs:
    """What one layer did to one sequence: its router input and, for MoE layers, router logits."""

    hidden: torch.Tensor
    router_input: torch.Tensor
    router_logits: torch.Tensor | None


@dataclass
class StreamedDecoder:
    """A Llama, Mistral or Mixtral decoder whose layers are loaded one at a time on demand."""

    config: dict[str, Any]
    tensors: dict[str, TensorLocation]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        model_type = str(self.config.get("model_type"))
        if model_type not in DECODER_MODULES:
            raise ModelError(
                f"Cannot run a {model_type!r} model layer by layer; supported: {', '.join(DECODER_MODULES)}."
            )
        self.model_type = model_type
        self.hf_config: PretrainedConfig = AutoConfig.for_model(**self.config)
        self.hf_config._attn_implementation = "sdpa"
        self.hf_config._experts_implementation = "eager"
        layer_class, rotary_class = DECODER_MODULES[model_type]
        self._layer_class = layer_class
        self._rotary = rotary_class(config=self.hf_config).to(self.device)
        self._expert_count = int(self.config.get("num_local_experts", 0))
        self._family = SOURCE_FAMILIES.get(model_type)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of one sequence, shape [1, T, hidden], float32."""
        table = read_tensor(self._tensor("model.embed_tokens.weight"))
        return table[token_ids].float().unsqueeze(0).to(self.device)

    def load_layer(self, layer: int, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder layer `layer` with its weights in float32; `overrides` replace named parameters."""
        weights = self._layer_weights(layer)
        weights.update(overrides or {})
        with torch.device("meta"):
            module = self._layer_class(self.hf_config, layer_idx=layer)
        module.load_state_dict(weights, assign=True, strict=True)
        return module.to(self.device).eval()

    def load_attention(self, layer: int) -> nn.Module:
        """Dense layer `layer` without its MLP weights: its output is the residual stream after attention.

        The MLP is the bulk of a layer; `dense_mlp` computes it from the file in slices instead.
        """
        prefix = f"model.layers.{layer}."
        mlp_names = {self._family.mlp_tensors[part] for part in MLP_PARTS}
        weights = {
            name[len(prefix) :]: read_tensor(location).float()
            for name, location in self.tensors.items()
            if name.startswith(prefix) and name[len(prefix) :] not in mlp_names
        }
        with torch.device("meta"):
            module = self._layer_class(self.hf_config, layer_idx=layer)
        module.mlp = _NoMLP()
        module.load_state_dict(weights, assign=True, strict=True)
        return module.to(self.device).eval()

    def dense_mlp(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP applied to `tokens` [N, hidden], reading its weights in row slices.

        Only one slice of each matrix is in float32 memory at a time, so the memory of a pass does
        not grow with the intermediate size; all prompts' tokens go through each slice together.
        """
        gate_proj, up_proj, down_proj = (self._tensor(self._family.mlp_name(layer, part)) for part in MLP_PARTS)
        activation = ACT2FN[self.hf_config.hidden_act]

        def rows(location: TensorLocation, start: int) -> torch.Tensor:
            return read_rows(location, start, start + MLP_ROWS_PER_SLICE).to(self.device).float()

        intermediate = torch.cat(
            [
                activation(tokens @ rows(gate_proj, start).T) * (tokens @ rows(up_proj, start).T)
                for start in range(0, gate_proj.shape[0], MLP_ROWS_PER_SLICE)
            ],
            dim=-1,
        )
        return torch.cat(
            [intermediate @ rows(down_proj, start).T for start in range(0, down_proj.shape[0], MLP_ROWS_PER_SLICE)],
            dim=-1,
        )

    def run_layer(self, module: nn.Module, hidden: torch.Tensor) -> LayerOutputs:
        """Run one sequence ([1, T, hidden]) through a loaded layer, capturing the router's view."""
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            module.post_attention_layernorm.register_forward_hook(
                lambda _module, _inputs, output: captured.__setitem__("router_input", output)
            )
        ]
        gate = getattr(getattr(module, "mlp", None), "gate", None)
        if gate is not None:
            hooks.append(
                gate.register_forward_hook(lambda _module, _inputs, output: captured.__setitem__("logits", output[0]))
            )
        length = hidden.shape[1]
        position_ids = torch.arange(length, device=self.device).unsqueeze(0)
        try:
            with torch.no_grad():
                output = module(
                    hidden,
                    attention_mask=self._causal_mask(length),
                    position_ids=position_ids,
                    position_embeddings=self._rotary(hidden, position_ids),
                )
        finally:
            for hook in hooks:
                hook.remove()
        return LayerOutputs(output, captured["router_input"][0], captured.get("logits"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: [1, T, hidden] -> [T, vocab]."""
        norm_weight = read_tensor(self._tensor("model.norm.weight")).float().to(self.device)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        normed = hidden * torch.rsqrt(variance + float(self.config.get("rms_norm_eps", 1e-6))) * norm_weight
        head_name = "model.embed_tokens.weight" if self.config.get("tie_word_embeddings") else "lm_head.weight"
        head = read_tensor(self._tensor(head_name)).float().to(self.device)
        return (normed[0] @ head.T).float()

    def _causal_mask(self, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=self.device)
        allowed = positions[None, :] <= positions[:, None]
        window = self.config.get("sliding_window")
        if window:
            allowed &= positions[None, :] > positions[:, None] - int(window)
        mask = torch.zeros(length, length, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return mask[None, None]

    def _tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"The checkpoint has no tensor {name!r}.") from None

    def _layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}."
        raw = {
            name[len(prefix) :]: read_tensor(loc).float()
            for name, loc in self.tensors.items()
            if name.startswith(prefix)
        }
        if self.model_type != "mixtral":
            return raw
        layout = detect_layout(self.tensors)
        parts = expert_parts(layout, raw, layer, self._expert_count)
        weights = {name: tensor for name, tensor in raw.items() if not _belongs_to_moe(name, layout, layer)}
        weights[_relative(MODULE_LAYOUT.router_name(layer), layer)] = raw[_relative(layout.router_name(layer), layer)]
        for tensor in MODULE_LAYOUT.expert_tensors:
            name = _relative(tensor.template.format(layer=layer, expert=0), layer)
            weights[name] = torch.stack(
                [torch.cat([parts[expert][part] for part in tensor.parts]) for expert in range(self._expert_count)]
            )
        return weights


class _NoMLP(nn.Module):
    """Stands in for a layer's MLP so the layer's output is the residual stream after attention."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


def detect_layout(tensors: dict[str, TensorLocation]) -> OutputLayout:
    """Which Mixtral tensor layout a checkpoint uses, judged by layer 0's router name."""
    for layout in OUTPUT_LAYOUTS.values():
        if layout.router_name(0) in tensors:
            return layout
    raise ModelError(
        "The checkpoint has no Mixtral router tensor for layer 0 in any known layout; it is not a Mixtral MoE."
    )


def expert_parts(
    layout: OutputLayout, layer_weights: dict[str, torch.Tensor], layer: int, expert_count: int
) -> list[dict[str, torch.Tensor]]:
    """Each expert's gate_proj, up_proj and down_proj, from a layer's tensors in `layout`."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(expert_count)]
    for tensor in layout.expert_tensors:
        for expert in range(expert_count):
            name = _relative(tensor.template.format(layer=layer, expert=expert), layer)
            if name not in layer_weights:
                raise ModelError(f"The checkpoint is missing tensor {name!r} of layer {layer}.")
            source = layer_weights[name][expert] if tensor.stacked else layer_weights[name]
            for part, chunk in zip(tensor.parts, source.chunk(len(tensor.parts)), strict=True):
                parts[expert][part] = chunk
    missing = set(MLP_PARTS) - set(parts[0])
    if missing:
        raise ModelError(f"Layout {layout.name} leaves expert parts {sorted(missing)} undefined.")
    return parts


def _relative(name: str, layer: int) -> str:
    return name.removeprefix(f"model.layers.{layer}.")


def _belongs_to_moe(name: str, layout: OutputLayout, layer: int) -> bool:
    moe_prefix = _relative(layout.router_name(layer), layer).split(".")[0]
    return name.startswith(moe_prefix + ".")


def router_inputs_by_layer(
    decoder: StreamedDecoder, sequences: Sequence[torch.Tensor], layers: Iterable[int] | None = None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each layer in order, every sequence's router input ([T, hidden], float32).

    Only one layer's weights are in memory at a time; the residual stream of every sequence is
    carried from layer to layer.
    """
    hidden = [decoder.embed(tokens) for tokens in sequences]
    for layer in layers if layers is not None else range(decoder.num_layers):
        module = decoder.load_layer(layer)
        outputs = [decoder.run_layer(module, state) for state in hidden]
        del module
        hidden = [output.hidden for output in outputs]
        yield layer, [output.router_input for output in outputs]
