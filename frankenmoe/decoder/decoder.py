"""Run a decoder one layer at a time from streamed weights, so no pass holds a whole model.

A layer is its attention (frankenmoe.decoder.attention) and its MLP (frankenmoe.decoder.moe), every
matrix applied from the checkpoint file in slices of rows (frankenmoe.decoder.slices). transformers'
modeling modules take about two seconds to import, so no pass imports them: laser's calibration check
runs these same layers with its reduced matrices given as `overrides`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from frankenmoe.architectures.expected import detect_layout
from frankenmoe.architectures.roles import (
    ATTENTION_PROJECTIONS,
    EMBEDDINGS,
    FINAL_NORM,
    LAYER_NORMS,
    LAYER_PREFIX,
    LM_HEAD,
    MLP_PARTS,
    QK_NORMS,
)
from frankenmoe.architectures.tables import (
    OUTPUT_ARCHITECTURES,
    SOURCE_FAMILIES,
    OutputArchitecture,
    OutputLayout,
    SourceFamily,
)
from frankenmoe.decoder.attention import KeyValueCache, LayerOutputs, LoadedAttention, SelfAttention
from frankenmoe.decoder.moe import (
    MLPWeights,
    SharedExpert,
    activation_function,
    expert_mlp_weights,
    moe_forward,
    sliced_mlp,
)
from frankenmoe.decoder.slices import MatrixRows, SliceCache, map_slices, slice_product, slice_starts
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import TensorLocation, advise_will_need, read_tensor
from frankenmoe.sources.trunk import TrunkMerge

if TYPE_CHECKING:  # transformers is slow to import: a merge that runs no decoder never imports it
    from transformers import PretrainedConfig


@dataclass
class LayerPass:
    """Every sequence after one whole layer, with what its router saw."""

    hidden: list[torch.Tensor]
    router_inputs: list[torch.Tensor]
    router_logits: list[torch.Tensor] | None


@dataclass
class StreamedDecoder:
    """A decoder of any family or output architecture in the tables, its layers loaded one at a time."""

    config: dict[str, Any]
    tensors: Mapping[str, TensorLocation]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    in_memory: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Small tensors (routers, shared-expert gates) given as values, read instead of `tensors`' entry of
    the same name: a merge's routing check uses the computed rows before the writer has written them."""
    merged: Mapping[str, TrunkMerge] = field(default_factory=dict)
    """Shared tensors made from the base and the experts (`shared_weights`), computed where they are read,
    so the hidden-state pass runs on the merged trunk the output will have."""
    read_ahead: bool = False
    """Before each layer, ask the kernel to start reading the next one's tensors (`advise_will_need`), so
    that from a cold page cache the disk reads while this layer computes; each layer is advised once."""
    slice_cache: SliceCache | None = None
    """Where matrix slices converted to float32 are kept between passes (text generation), if anywhere."""

    def __post_init__(self) -> None:
        from transformers import AutoConfig

        model_type = str(self.config.get("model_type"))
        self.family: SourceFamily | None = SOURCE_FAMILIES.get(model_type)
        self.moe: OutputArchitecture | None = OUTPUT_ARCHITECTURES.get(model_type)
        entry = self.family or self.moe
        if entry is None:
            known = sorted({*SOURCE_FAMILIES, *OUTPUT_ARCHITECTURES})
            raise ModelError(f"Cannot run a {model_type!r} model layer by layer; supported: {', '.join(known)}.")
        self.hf_config: PretrainedConfig = AutoConfig.for_model(**self.config)
        self._attention_weights = tuple(weight.name for weight in entry.layer_weights)
        self._activation = activation_function(self.hf_config.hidden_act)
        self._advised: set[int] = set()
        self._attention = SelfAttention(self.hf_config, self.device)
        self.layout: OutputLayout | None = None if self.moe is None else detect_layout(self.moe, self.tensors)
        self._expert_count = 0 if self.moe is None else int(self.config.get(self.moe.expert_count_key) or 0)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of one sequence, shape [1, T, hidden], float32."""
        merged = self.merged.get(EMBEDDINGS.name)
        if merged is not None:
            rows = torch.cat([merged.rows(int(token), int(token) + 1) for token in token_ids])
            return rows.unsqueeze(0).to(self.device)
        table = read_tensor(self._tensor(EMBEDDINGS.name))
        return table[token_ids].float().unsqueeze(0).to(self.device)

    def load_attention(self, layer: int, overrides: Mapping[str, torch.Tensor] | None = None) -> LoadedAttention:
        """Layer `layer`'s attention: its norms in float32, and where its projections and their biases are;
        a weight named in `overrides` (by its name in the layer) has the value given there instead."""
        prefix = LAYER_PREFIX.format(layer=layer)
        overrides = overrides or {}
        norms: dict[str, torch.Tensor] = {}
        projections: dict[str, MatrixRows] = {}
        biases: dict[str, torch.Tensor] = {}
        # Only the table's weights: buffers such as rotary_emb.inv_freq are recomputed from the config.
        for name in self._attention_weights:
            if prefix + name not in self.tensors:
                continue
            module_name, _, parameter = name.rpartition(".")
            projection = module_name.removeprefix("self_attn.")
            if projection not in ATTENTION_PROJECTIONS or module_name == projection:
                if name not in (*LAYER_NORMS, *QK_NORMS):
                    raise ModelError(f"Layer weight {prefix + name} has no place in the streamed attention.")
                norms[name] = self._layer_tensor(prefix, name, overrides)
            elif parameter == "weight":
                merged = self.merged.get(prefix + name)
                if name in overrides:
                    projections[projection] = MatrixRows.of_tensor(self.tensors[prefix + name], overrides[name])
                elif merged is not None:
                    projections[projection] = MatrixRows.of_merge(merged)
                else:
                    projections[projection] = MatrixRows.whole(self.tensors[prefix + name])
            else:
                biases[projection] = self._layer_tensor(prefix, name, overrides)
        missing = [f"self_attn.{name}.weight" for name in ATTENTION_PROJECTIONS if name not in projections]
        missing += [name for name in LAYER_NORMS if name not in norms]
        if missing:
            raise ModelError(f"The checkpoint is missing tensor {prefix}{missing[0]}.")
        return LoadedAttention(norms, projections, biases, self.slice_cache)

    def _layer_tensor(self, prefix: str, name: str, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        given = overrides.get(name)
        value = self._float_tensor(prefix + name) if given is None else given.float()
        return value.to(self.device)

    def forward_layer(
        self,
        layer: int,
        hidden: list[torch.Tensor],
        caches: Sequence[KeyValueCache] | None = None,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> LayerPass:
        """Run every sequence ([1, T, hidden] each) through layer `layer` (behind its cache, see `attend`).

        `overrides` replace weights of this layer for this call, by their name in the layer
        (`mlp.gate_proj.weight`, `self_attn.q_proj.weight`...): laser's calibration check runs the layer
        with a reduced matrix this way, without writing it anywhere.
        """
        self._check_overrides(layer, overrides or {})
        outputs = self.attend(layer, hidden, caches, overrides)
        router_inputs = [output.router_input for output in outputs]
        with torch.no_grad():
            mlp_outputs, logits = self.mlp(layer, torch.cat(router_inputs), overrides)
        lengths = [len(inputs) for inputs in router_inputs]
        return LayerPass(
            hidden=add_mlp_outputs(outputs, mlp_outputs),
            router_inputs=router_inputs,
            router_logits=None if logits is None else list(logits.split(lengths)),
        )

    def _check_overrides(self, layer: int, overrides: Mapping[str, torch.Tensor]) -> None:
        """Refuse an override this decoder would not use (a misspelt name would otherwise change nothing)."""
        prefix = LAYER_PREFIX.format(layer=layer)
        mlp_names = () if self.family is None else tuple(weight.name for weight in self.family.mlp.values())
        replaceable = {*self._attention_weights, *mlp_names}
        for name, value in overrides.items():
            location = self.tensors.get(prefix + name)
            if name not in replaceable or location is None:
                raise ModelError(
                    f"Cannot override {prefix + name}: it is not a weight of this checkpoint's layer {layer} that "
                    f"the streamed decoder runs ({', '.join(sorted(replaceable))})."
                )
            if tuple(value.shape) != tuple(location.shape):
                raise ModelError(
                    f"The override of {prefix + name} has shape {tuple(value.shape)}, but the weight it replaces "
                    f"has shape {tuple(location.shape)}."
                )

    def attend(
        self,
        layer: int,
        hidden: list[torch.Tensor],
        caches: Sequence[KeyValueCache] | None = None,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> list[LayerOutputs]:
        """Every sequence through layer `layer`'s attention: the residual stream after it, and the MLP's input.

        With `caches` (one per sequence), `hidden` holds only each sequence's new tokens; they attend to
        the keys and values their cache holds, which then gains theirs.
        """
        if self.read_ahead:
            self._advise(layer)
            self._advise(layer + 1)
        return self._attention.run(layer, self.load_attention(layer, overrides), hidden, caches)

    def mlp(
        self, layer: int, tokens: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's MLP on `tokens` [N, hidden], and for a MoE layer its router logits [N, experts]
        (`overrides` as in `forward_layer`: a MoE layer's experts are never overridden)."""
        logits = self.router_logits(layer, tokens)
        if logits is None or self.moe is None or self.layout is None:
            return self.dense_mlp(layer, tokens, overrides), None
        experts = expert_mlp_weights(self.layout, self.tensors, layer, self._expert_count)
        top_k = int(self.config.get("num_experts_per_tok", 2))
        renormalize = self.moe.routing.renormalizes(self.config)
        shared = self._shared_expert(layer)
        output = moe_forward(tokens, logits, experts, top_k, self._activation, renormalize, shared, self.slice_cache)
        return output, logits

    def router_logits(self, layer: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """A MoE layer's router logits [N, experts] for `tokens` [N, hidden] (None for a dense layer)."""
        if self.moe is None or self.layout is None:
            return None
        gate = self._small_tensor(self.layout.router_name(layer)).float().to(self.device)
        return tokens @ gate.T

    def _shared_expert(self, layer: int) -> SharedExpert | None:
        slots = None if self.moe is None else self.moe.shared_expert
        if slots is None:
            return None
        weights = MLPWeights(
            *(MatrixRows.whole(self._tensor(slots.mlp[part].format(layer=layer))) for part in MLP_PARTS)
        )
        gate = self._small_tensor(slots.gate.format(layer=layer)).float().to(self.device)
        return SharedExpert(weights, gate)

    def dense_mlp(
        self, layer: int, tokens: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """A dense layer's MLP applied to `tokens` [N, hidden], reading its weights in row slices (a matrix
        named in `overrides` by its name in the layer, e.g. `mlp.up_proj.weight`, from the value given there)."""
        if self.family is None:
            raise ModelError("A MoE checkpoint has no dense MLP; use mlp, which routes to its experts.")
        family = self.family
        overrides = overrides or {}

        def matrix(part: str) -> MatrixRows:
            location = self._tensor(family.mlp_name(layer, part))
            given = overrides.get(family.mlp[part].name)
            return MatrixRows.whole(location) if given is None else MatrixRows.of_tensor(location, given)

        weights = MLPWeights(*(matrix(part) for part in MLP_PARTS))
        return sliced_mlp(tokens, weights, self._activation, self.slice_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and language-model head: [1, T, hidden] -> [T, vocab]."""
        head = self._float_tensor(self._head().name).to(self.device)
        return (self._final_norm(hidden[0]) @ head.T).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely next token after each of `hidden` [N, hidden], the head read in row slices."""
        normed = self._final_norm(hidden)
        head = self._head_rows()
        best_logits = torch.full((len(hidden),), float("-inf"), device=self.device)
        best_tokens = torch.zeros(len(hidden), dtype=torch.long, device=self.device)

        def slice_best(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            return slice_product(normed, head, start, self.device, self.slice_cache).max(dim=-1)

        starts = slice_starts(head, self.device, self.slice_cache)
        for start, (slice_logits, slice_tokens) in zip(
            starts, map_slices(slice_best, starts, self.device), strict=True
        ):
            better = slice_logits > best_logits  # strict: a tie keeps the lower token id, as argmax does
            best_logits = torch.where(better, slice_logits, best_logits)
            best_tokens = torch.where(better, slice_tokens + start, best_tokens)
        return best_tokens

    def target_log_probabilities(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[i] | hidden[i]) for `hidden` [N, hidden], float32 [N]: the head is read in row
        slices and each slice's log-sum-exp is combined in slice order, so no [N, vocab] logits are held
        and the result is the same for any number of slice workers."""
        normed = self._final_norm(hidden)
        head = self._head_rows()

        def slice_scores(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            logits = slice_product(normed, head, start, self.device, self.slice_cache)
            inside = (targets >= start) & (targets < start + logits.shape[-1])
            picked = logits.gather(1, (targets - start).clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
            return torch.logsumexp(logits, dim=-1), torch.where(inside, picked, torch.zeros_like(picked))

        parts = map_slices(slice_scores, slice_starts(head, self.device, self.slice_cache), self.device)
        normaliser = torch.logsumexp(torch.stack([normalisers for normalisers, _ in parts]), dim=0)
        # Exactly one slice holds each target; the others add exact zeros.
        return torch.stack([picked for _, picked in parts]).sum(dim=0) - normaliser

    def _head_rows(self) -> MatrixRows:
        merged_head = self.merged.get(self._head().name)
        return MatrixRows.whole(self._head()) if merged_head is None else MatrixRows.of_merge(merged_head)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._attention.rms_norm(hidden, self._float_tensor(FINAL_NORM.name).to(self.device))

    def _head(self) -> TensorLocation:
        return self._tensor(EMBEDDINGS.name if self.config.get("tie_word_embeddings") else LM_HEAD.name)

    def _float_tensor(self, name: str) -> torch.Tensor:
        """A whole tensor in float32: merged from the base and the experts when it is, else read."""
        merged = self.merged.get(name)
        return read_tensor(self._tensor(name)).float() if merged is None else merged.tensor()

    def _tensor(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"The checkpoint has no tensor {name!r}.") from None

    def _advise(self, layer: int) -> None:
        """Read-ahead hints for layer `layer`'s tensors (past the last layer: the final norm and the head)."""
        if layer in self._advised or layer > self.num_layers:
            return
        self._advised.add(layer)
        if layer == self.num_layers:
            names = [FINAL_NORM.name, self._head().name]
        else:
            prefix = LAYER_PREFIX.format(layer=layer)
            names = [name for name in self.tensors if name.startswith(prefix)]
        advise_will_need(self.tensors[name] for name in names if name in self.tensors)

    def _small_tensor(self, name: str) -> torch.Tensor:
        """A router or gate: the value given in `in_memory`, else the tensor read from the checkpoint."""
        given = self.in_memory.get(name)
        return read_tensor(self._tensor(name)) if given is None else given


def add_mlp_outputs(outputs: list[LayerOutputs], mlp_outputs: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's residual stream after the whole layer, from the MLP's output over all their tokens."""
    lengths = [len(output.router_input) for output in outputs]
    return [
        output.hidden + mlp_output.unsqueeze(0)
        for output, mlp_output in zip(outputs, mlp_outputs.split(lengths), strict=True)
    ]


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
