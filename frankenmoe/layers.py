"""Run a decoder one layer at a time from streamed weights, so no pass holds a whole model.

A layer's attention is a transformers decoder-layer module built on the meta device and filled
with that layer's tensors in float32, so the maths is what transformers computes at inference. Its
MLP (dense, or Mixtral's experts behind the router) is computed from the checkpoint file in slices
of rows, over every sequence's tokens at once: a float32 copy of a whole MLP is never made.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache

from frankenmoe.architectures import (
    EMBEDDINGS,
    FINAL_NORM,
    LAYER_PREFIX,
    LM_HEAD,
    MLP_PARTS,
    OUTPUT_ARCHITECTURES,
    SOURCE_FAMILIES,
    OutputArchitecture,
    OutputLayout,
    SourceFamily,
    transformers_class,
)
from frankenmoe.errors import ModelError
from frankenmoe.lora import LoraDelta
from frankenmoe.memory import reuse_large_buffers
from frankenmoe.tensor_io import TensorLocation, read_rows, read_tensor

SLICE_BYTES = 4 * 1024 * 1024
"""Float32 bytes of a matrix (MLP or language-model head) converted at a time: small enough that,
while text is generated, each slice's buffer is reused from the heap (see memory.py)."""


@dataclass
class LayerOutputs:
    """What one loaded layer did to one sequence, and the input its router (or MLP) saw."""

    hidden: torch.Tensor
    router_input: torch.Tensor


@dataclass
class LayerPass:
    """Every sequence after one whole layer, with what its router saw."""

    hidden: list[torch.Tensor]
    router_inputs: list[torch.Tensor]
    router_logits: list[torch.Tensor] | None


@dataclass(frozen=True)
class MatrixRows:
    """A block of rows of a checkpoint tensor seen as a matrix: one MLP matrix of one expert.

    With `lora`, the matrix is W + scale * B @ A (a source expert given as model+adapter): each slice
    gets its rows of the delta, so no whole float32 matrix is made here either.
    """

    location: TensorLocation
    first_row: int
    num_rows: int
    lora: LoraDelta | None = None

    @classmethod
    def whole(cls, location: TensorLocation, lora: LoraDelta | None = None) -> MatrixRows:
        return cls(location, 0, location.shape[0], lora)

    @property
    def slice_starts(self) -> range:
        """First row of each slice that `read` returns, SLICE_BYTES of float32 at most (one row at least)."""
        return range(0, self.num_rows, max(1, SLICE_BYTES // (self.location.shape[-1] * 4)))

    def read(self, start: int, device: torch.device) -> torch.Tensor:
        """The slice of this block that begins at row `start` (one of `slice_starts`), in float32."""
        stop = min(start + self.slice_starts.step, self.num_rows)
        rows = read_rows(self.location, self.first_row + start, self.first_row + stop).to(device).float()
        if self.lora is not None:
            rows += self.lora.rows(self.first_row + start, self.first_row + stop, device)
        return rows


@dataclass(frozen=True)
class MLPWeights:
    """Where a SwiGLU MLP's three matrices are; `down_scale` multiplies down_proj (residual_scale)."""

    gate_proj: MatrixRows
    up_proj: MatrixRows
    down_proj: MatrixRows
    down_scale: float | None = None


def sliced_mlp(tokens: torch.Tensor, weights: MLPWeights, activation: nn.Module) -> torch.Tensor:
    """down_proj(act(gate_proj x) * up_proj x) for tokens [N, hidden], one row slice at a time."""
    device = tokens.device
    intermediate = torch.cat(
        [
            activation(tokens @ weights.gate_proj.read(start, device).T) * (tokens @ weights.up_proj.read(start, device).T)
            for start in weights.gate_proj.slice_starts
        ],
        dim=-1,
    )
    output = torch.cat(
        [
            intermediate @ weights.down_proj.read(start, device).T
            for start in weights.down_proj.slice_starts
        ],
        dim=-1,
    )
    return output if weights.down_scale is None else output * weights.down_scale


@dataclass(frozen=True)
class SharedExpert:
    """An MLP every token goes through, its output scaled by sigmoid(tokens · gate) (Qwen2-MoE)."""

    weights: MLPWeights
    gate: torch.Tensor
    """[1, hidden] float32."""


def moe_forward(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    experts: Sequence[MLPWeights],
    top_k: int,
    activation: nn.Module,
    renormalize: bool = True,
    shared: SharedExpert | None = None,
) -> torch.Tensor:
    """A sparse MoE MLP: softmax over all experts in float32, top-k (weights renormalised to 1 when
    `renormalize`), plus the shared expert behind its sigmoid gate when there is one."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    top_weights, top_experts = probabilities.topk(top_k, dim=-1)
    if renormalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    output = torch.zeros_like(tokens)
    if shared is not None and shared.weights.down_proj.num_rows and shared.weights.gate_proj.num_rows:
        output += torch.sigmoid(tokens @ shared.gate.T) * sliced_mlp(tokens, shared.weights, activation)
    for index, weights in enumerate(experts):
        chosen = (top_experts == index).any(dim=-1).nonzero().squeeze(-1)
        if len(chosen):
            weight = (top_weights[chosen] * (top_experts[chosen] == index)).sum(dim=-1, keepdim=True)
            output[chosen] += weight * sliced_mlp(tokens[chosen], weights, activation)
    return output


def expert_mlp_weights(
    layout: OutputLayout, tensors: dict[str, TensorLocation], layer: int, expert_count: int
) -> list[MLPWeights]:
    """Where each expert's gate_proj, up_proj and down_proj rows are, in a checkpoint of `layout`."""
    experts: list[dict[str, MatrixRows]] = [{} for _ in range(expert_count)]
    for tensor in layout.expert_tensors:
        for expert in range(expert_count):
            name = tensor.template.format(layer=layer, expert=expert)
            if name not in tensors:
                raise ModelError(f"The checkpoint is missing tensor {name!r} of layer {layer}.")
            location = tensors[name]
            block_rows = location.shape[-2]
            first_row = expert * block_rows if tensor.stacked else 0
            part_rows = block_rows // len(tensor.parts)
            for position, part in enumerate(tensor.parts):
                experts[expert][part] = MatrixRows(location, first_row + position * part_rows, part_rows)
    return [MLPWeights(*(parts[part] for part in MLP_PARTS)) for parts in experts]


@dataclass
class StreamedDecoder:
    """A decoder of any family or output architecture in the tables, its layers loaded one at a time."""

    config: dict[str, Any]
    tensors: dict[str, TensorLocation]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        model_type = str(self.config.get("model_type"))
        self.family: SourceFamily | None = SOURCE_FAMILIES.get(model_type)
        self.moe: OutputArchitecture | None = OUTPUT_ARCHITECTURES.get(model_type)
        entry = self.family or self.moe
        if entry is None:
            known = sorted({*SOURCE_FAMILIES, *OUTPUT_ARCHITECTURES})
            raise ModelError(f"Cannot run a {model_type!r} model layer by layer; supported: {', '.join(known)}.")
        self.hf_config: PretrainedConfig = AutoConfig.for_model(**self.config)
        self.hf_config._attn_implementation = "sdpa"
        self.hf_config._experts_implementation = "eager"
        layer_class, rotary_class = transformers_class(entry.decoder_layer), transformers_class(entry.rotary)
        self._layer_class = layer_class
        self._attention_weights = tuple(weight.name for weight in entry.layer_weights)
        # transformers renamed the decoder layer's cache argument from past_key_values to cache.
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"
        )
        self._rotary = rotary_class(config=self.hf_config).to(self.device)
        self.layout: OutputLayout | None = None if self.moe is None else detect_layout(self.moe, self.tensors)
        self._expert_count = 0 if self.moe is None else int(self.config.get(self.moe.expert_count_key) or 0)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of one sequence, shape [1, T, hidden], float32."""
        table = read_tensor(self._tensor(EMBEDDINGS.name))
        return table[token_ids].float().unsqueeze(0).to(self.device)

    def load_layer(self, layer: int, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Dense decoder layer `layer` with its weights in float32; `overrides` replace named parameters."""
        weights = self._layer_weights(layer)
        weights.update(overrides or {})
        with torch.device("meta"):
            module = self._layer_class(self.hf_config, layer_idx=layer)
        module.load_state_dict(weights, assign=True, strict=True)
        return module.to(self.device).eval()

    def load_attention(self, layer: int) -> nn.Module:
        """Layer `layer` without its MLP weights: its output is the residual stream after attention.

        The MLP is the bulk of a layer; `mlp` computes it from the file in slices instead.
        """
        prefix = LAYER_PREFIX.format(layer=layer)
        # Only the table's weights: buffers such as rotary_emb.inv_freq are recomputed from the config.
        weights = {
            name: read_tensor(self.tensors[prefix + name]).float()
            for name in self._attention_weights
            if prefix + name in self.tensors
        }
        with torch.device("meta"):
            module = self._layer_class(self.hf_config, layer_idx=layer)
        module.mlp = _NoMLP()
        module.load_state_dict(weights, assign=True, strict=True)
        return module.to(self.device).eval()

    def forward_layer(
        self, layer: int, hidden: list[torch.Tensor], caches: Sequence[DynamicCache] | None = None
    ) -> LayerPass:
        """Run every sequence ([1, T, hidden] each) through layer `layer` (behind its cache, see `attend`)."""
        outputs = self.attend(layer, hidden, caches)
        router_inputs = [output.router_input for output in outputs]
        with torch.no_grad():
            mlp_outputs, logits = self.mlp(layer, torch.cat(router_inputs))
        lengths = [len(inputs) for inputs in router_inputs]
        return LayerPass(
            hidden=add_mlp_outputs(outputs, mlp_outputs),
            router_inputs=router_inputs,
            router_logits=None if logits is None else list(logits.split(lengths)),
        )

    def attend(
        self, layer: int, hidden: list[torch.Tensor], caches: Sequence[DynamicCache] | None = None
    ) -> list[LayerOutputs]:
        """Every sequence through layer `layer`'s attention: the residual stream after it, and the MLP's input.

        With `caches` (one per sequence), `hidden` holds only each sequence's new tokens; they attend to
        the keys and values their cache holds, which then gains theirs.
        """
        module = self.load_attention(layer)
        per_sequence = caches if caches is not None else [None] * len(hidden)
        return [self.run_layer(module, state, cache) for state, cache in zip(hidden, per_sequence, strict=True)]

    def mlp(self, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's MLP on `tokens` [N, hidden], and for a MoE layer its router logits [N, experts]."""
        if self.moe is None or self.layout is None:
            return self.dense_mlp(layer, tokens), None
        gate = read_tensor(self._tensor(self.layout.router_name(layer))).float().to(self.device)
        experts = expert_mlp_weights(self.layout, self.tensors, layer, self._expert_count)
        top_k = int(self.config.get("num_experts_per_tok", 2))
        activation = ACT2FN[self.hf_config.hidden_act]
        logits = tokens @ gate.T
        renormalize = self.moe.routing.renormalizes(self.config)
        return moe_forward(tokens, logits, experts, top_k, activation, renormalize, self._shared_expert(layer)), logits

    def _shared_expert(self, layer: int) -> SharedExpert | None:
        slots = None if self.moe is None else self.moe.shared_expert
        if slots is None:
            return None
        weights = MLPWeights(*(MatrixRows.whole(self._tensor(slots.mlp[part].format(layer=layer))) for part in MLP_PARTS))
        gate = read_tensor(self._tensor(slots.gate.format(layer=layer))).float().to(self.device)
        return SharedExpert(weights, gate)

    def dense_mlp(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP applied to `tokens` [N, hidden], reading its weights in row slices."""
        if self.family is None:
            raise ModelError("A MoE checkpoint has no dense MLP; use mlp, which routes to its experts.")
        family = self.family
        weights = MLPWeights(*(MatrixRows.whole(self._tensor(family.mlp_name(layer, part))) for part in MLP_PARTS))
        return sliced_mlp(tokens, weights, ACT2FN[self.hf_config.hidden_act])

    def run_layer(self, module: nn.Module, hidden: torch.Tensor, cache: DynamicCache | None = None) -> LayerOutputs:
        """Run one sequence ([1, T, hidden]) through a loaded layer, capturing the router's view.

        With a `cache`, the T tokens follow the ones it holds for this layer.
        """
        captured: dict[str, torch.Tensor] = {}
        hook = module.post_attention_layernorm.register_forward_hook(
            lambda _module, _inputs, output: captured.__setitem__("router_input", output)
        )
        length = hidden.shape[1]
        past = 0 if cache is None else cache.get_seq_length(module.self_attn.layer_idx)
        position_ids = torch.arange(past, past + length, device=self.device).unsqueeze(0)
        try:
            with torch.no_grad():
                output = module(
                    hidden,
                    attention_mask=self._causal_mask(module.self_attn.layer_idx, length, past),
                    position_ids=position_ids,
                    position_embeddings=self._rotary(hidden, position_ids),
                    **{self._cache_argument: cache},
                )
        finally:
            hook.remove()
        return LayerOutputs(output, captured["router_input"][0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: [1, T, hidden] -> [T, vocab]."""
        head = read_tensor(self._head()).float().to(self.device)
        return (self._final_norm(hidden[0]) @ head.T).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely next token after each of `hidden` [N, hidden], the head read in row slices."""
        normed = self._final_norm(hidden)
        head = MatrixRows.whole(self._head())
        best_logits = torch.full((len(hidden),), float("-inf"), device=self.device)
        best_tokens = torch.zeros(len(hidden), dtype=torch.long, device=self.device)
        for start in head.slice_starts:
            slice_logits, slice_tokens = (normed @ head.read(start, self.device).T).max(dim=-1)
            better = slice_logits > best_logits  # strict: a tie keeps the lower token id, as argmax does
            best_logits = torch.where(better, slice_logits, best_logits)
            best_tokens = torch.where(better, slice_tokens + start, best_tokens)
        return best_tokens

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm_weight = read_tensor(self._tensor(FINAL_NORM.name)).float().to(self.device)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return hidden * torch.rsqrt(variance + float(self.config.get("rms_norm_eps", 1e-6))) * norm_weight

    def _head(self) -> TensorLocation:
        return self._tensor(EMBEDDINGS.name if self.config.get("tie_word_embeddings") else LM_HEAD.name)

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

    def _tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"The checkpoint has no tensor {name!r}.") from None

    def _layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        if self.family is None:
            raise ModelError("A whole MoE layer is never loaded; use forward_layer, which streams the experts.")
        prefix = LAYER_PREFIX.format(layer=layer)
        names = (*self._attention_weights, *(weight.name for weight in self.family.mlp.values()))
        return {name: read_tensor(self.tensors[prefix + name]).float() for name in names if prefix + name in self.tensors}


def add_mlp_outputs(outputs: list[LayerOutputs], mlp_outputs: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's residual stream after the whole layer, from the MLP's output over all their tokens."""
    lengths = [len(output.router_input) for output in outputs]
    return [
        output.hidden + mlp_output.unsqueeze(0)
        for output, mlp_output in zip(outputs, mlp_outputs.split(lengths), strict=True)
    ]


class _NoMLP(nn.Module):
    """Stands in for a layer's MLP so the layer's output is the residual stream after attention."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


def detect_layout(arch: OutputArchitecture, tensors: dict[str, TensorLocation]) -> OutputLayout:
    """Which of `arch`'s tensor layouts a checkpoint uses, judged by layer 0's router name."""
    for layout in arch.layouts.values():
        if layout.router_name(0) in tensors:
            return layout
    raise ModelError(
        f"The checkpoint has no {arch.model_type} router tensor for layer 0 in any known layout "
        f"({', '.join(layout.router_name(0) for layout in arch.layouts.values())}); it is not a {arch.model_type} MoE."
    )


def router_inputs_by_layer(
    decoder: StreamedDecoder, sequences: Sequence[torch.Tensor], layers: Iterable[int] | None = None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each layer in order, every sequence's router input ([T, hidden], float32).

    Only one layer's attention weights and one slice of an MLP matrix are in memory at a time; the
    residual stream of every sequence is carried from layer to layer.
    """
    hidden = [decoder.embed(tokens) for tokens in sequences]
    for layer in layers if layers is not None else range(decoder.num_layers):
        layer_pass = decoder.forward_layer(layer, hidden)
        hidden = layer_pass.hidden
        yield layer, layer_pass.router_inputs


def greedy_continuations(
    decoder: StreamedDecoder,
    sequences: Sequence[torch.Tensor],
    max_new_tokens: int,
    stop_tokens: Collection[int],
    on_step: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    """What the model writes after each sequence, greedily: up to `max_new_tokens` token ids each.

    A continuation ends before its first stop token, and where the model's context would overflow.
    Every step streams the whole decoder once for all unfinished sequences together; each sequence's
    keys and values are cached, so a step costs one token per sequence.
    """
    limit = int(decoder.config.get("max_position_embeddings") or 0)
    budgets = [max(0, min(max_new_tokens, limit - len(tokens))) if limit else max_new_tokens for tokens in sequences]
    written: list[list[int]] = [[] for _ in sequences]
    caches = [DynamicCache() for _ in sequences]
    feeding = {index: tokens for index, tokens in enumerate(sequences) if budgets[index] > 0}
    with reuse_large_buffers():
        for _ in range(max(budgets, default=0)):
            if not feeding:
                break
            active = list(feeding)
            next_tokens = _greedy_step(decoder, [feeding[index] for index in active], [caches[index] for index in active])
            feeding = {}
            for index, token in zip(active, next_tokens, strict=True):
                if token in stop_tokens:
                    continue
                written[index].append(token)
                if len(written[index]) < budgets[index]:
                    feeding[index] = torch.tensor([token], dtype=torch.long)
            if on_step is not None:
                on_step()
    return [torch.tensor(tokens, dtype=torch.long) for tokens in written]


def _greedy_step(decoder: StreamedDecoder, new_tokens: list[torch.Tensor], caches: list[DynamicCache]) -> list[int]:
    """Run each sequence's new tokens through every layer behind its cache; the next token of each."""
    hidden = [decoder.embed(tokens) for tokens in new_tokens]
    for layer in range(decoder.num_layers):
        hidden = decoder.forward_layer(layer, hidden, caches).hidden
    with torch.no_grad():
        return decoder.greedy_tokens(torch.cat([state[0, -1:] for state in hidden])).tolist()
