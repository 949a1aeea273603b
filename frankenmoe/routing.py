"""Where tokens go in a Mixtral-format checkpoint: per-token router probabilities, layer by layer.

Works on any Mixtral checkpoint (ours in either tensor layout, or one made by another tool); the
model is streamed one decoder layer at a time, so memory stays at one layer plus activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.errors import ModelError
from frankenmoe.layers import StreamedDecoder
from frankenmoe.routers.prompts import EncodedPrompt, encode_prompts, load_tokenizer
from frankenmoe.sources import index_tensors, read_model_config
from frankenmoe.tensor_io import TensorLocation


@dataclass(frozen=True)
class Checkpoint:
    """A Mixtral-format model folder: its config and an index of its tensors (nothing loaded)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorLocation]

    @property
    def num_experts(self) -> int:
        return int(self.config["num_local_experts"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise ModelError(f"Checkpoint folder {path} does not exist. Pass the folder a merge wrote.")
    config = read_model_config(str(path), path)
    if config.get("model_type") != "mixtral" or not config.get("num_local_experts"):
        raise ModelError(
            f"{path} holds a {config.get('model_type')!r} model, not a Mixtral-format MoE "
            "(config.json needs model_type mixtral and num_local_experts)."
        )
    return Checkpoint(path, config, index_tensors(str(path), path))


@dataclass(frozen=True)
class PromptRouting:
    """One prompt's routing: router probabilities for every layer and token."""

    prompt: EncodedPrompt
    tokens: tuple[str, ...]
    probabilities: torch.Tensor
    """[layers, tokens, experts], the softmax of the router logits in float32."""

    @property
    def top_expert(self) -> torch.Tensor:
        """[layers, tokens]: the expert with the highest router probability."""
        return self.probabilities.argmax(dim=-1)


def route_prompts(
    checkpoint: Checkpoint, texts: Sequence[str], device: torch.device | None = None, layers: Iterable[int] | None = None
) -> list[PromptRouting]:
    """Run each prompt through the checkpoint, one layer at a time, recording router probabilities."""
    prompts = encode_prompts(checkpoint.path, checkpoint.config, texts)
    tokenizer = load_tokenizer(checkpoint.path)
    decoder = StreamedDecoder(checkpoint.config, checkpoint.tensors, device or torch.device("cpu"))
    hidden = [decoder.embed(prompt.token_ids) for prompt in prompts]
    per_layer: list[list[torch.Tensor]] = []
    for layer in layers if layers is not None else range(checkpoint.num_layers):
        module = decoder.load_layer(layer)
        outputs = [decoder.run_layer(module, state) for state in hidden]
        del module
        hidden = [output.hidden for output in outputs]
        per_layer.append([torch.softmax(output.router_logits.float(), dim=-1).cpu() for output in outputs])
    return [
        PromptRouting(
            prompt=prompt,
            tokens=tuple(tokenizer.convert_ids_to_tokens(prompt.token_ids.tolist())),
            probabilities=torch.stack([layer_probabilities[index] for layer_probabilities in per_layer]),
        )
        for index, prompt in enumerate(prompts)
    ]


@dataclass(frozen=True)
class RoutingSummary:
    """Routing statistics over a set of prompts, counted on content tokens (special tokens excluded)."""

    utilisation: torch.Tensor
    """[layers, experts]: the share of tokens whose top-1 expert is each expert."""
    mean_entropy: float
    """Mean over layers and tokens of the router distribution's entropy, in nats (max ln(experts))."""

    @property
    def overall_utilisation(self) -> torch.Tensor:
        return self.utilisation.mean(dim=0)


@dataclass(frozen=True)
class RoutingAccuracy:
    """How often labelled prompts reach their expert (see `routing_accuracy` for the definitions)."""

    prompt_accuracy: float
    token_accuracy_by_layer: tuple[float, ...]
    prompt_accuracy_by_expert: dict[int, float]
    token_accuracy_by_expert: dict[int, float]

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_accuracy_by_layer) / len(self.token_accuracy_by_layer)


def content_probabilities(routing: PromptRouting) -> torch.Tensor:
    """[layers, content tokens, experts]: the probabilities of the prompt's own tokens only."""
    return routing.probabilities[:, routing.prompt.content_mask]


def summarise_routing(routings: Sequence[PromptRouting]) -> RoutingSummary:
    probabilities = torch.cat([content_probabilities(routing) for routing in routings], dim=1)
    experts = probabilities.shape[-1]
    top = probabilities.argmax(dim=-1)
    counts = torch.stack([torch.bincount(layer_top, minlength=experts) for layer_top in top]).float()
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1)
    return RoutingSummary(counts / counts.sum(dim=-1, keepdim=True), float(entropy.mean()))


def preferred_expert(routing: PromptRouting) -> int:
    """The expert with the largest router probability summed over all layers and content tokens."""
    return int(content_probabilities(routing).sum(dim=(0, 1)).argmax())


def routing_accuracy(routings: Sequence[PromptRouting], labels: Sequence[int]) -> RoutingAccuracy:
    """Prompt level: is `preferred_expert` the label. Token level: per layer, the share of content
    tokens whose top-1 expert is the label (pooled over all prompts)."""
    if len(routings) != len(labels) or not routings:
        raise ValueError("routing_accuracy needs one label per routed prompt, and at least one prompt")
    prompt_hits = [preferred_expert(routing) == label for routing, label in zip(routings, labels, strict=True)]
    token_hits = [content_probabilities(routing).argmax(dim=-1) == label for routing, label in zip(routings, labels, strict=True)]
    all_hits = torch.cat(token_hits, dim=1).float()
    by_expert_prompt: dict[int, float] = {}
    by_expert_token: dict[int, float] = {}
    for expert in sorted(set(labels)):
        chosen = [index for index, label in enumerate(labels) if label == expert]
        by_expert_prompt[expert] = sum(prompt_hits[index] for index in chosen) / len(chosen)
        by_expert_token[expert] = float(torch.cat([token_hits[index] for index in chosen], dim=1).float().mean())
    return RoutingAccuracy(
        prompt_accuracy=sum(prompt_hits) / len(prompt_hits),
        token_accuracy_by_layer=tuple(float(value) for value in all_hits.mean(dim=1)),
        prompt_accuracy_by_expert=by_expert_prompt,
        token_accuracy_by_expert=by_expert_token,
    )
