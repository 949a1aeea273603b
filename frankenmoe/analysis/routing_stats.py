"""Statistics over routed prompts: expert utilisation, router entropy, accuracy against labels, and the JSON-ready
dicts `frankenmoe route --json` prints (counted on content tokens; special tokens excluded)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from frankenmoe.analysis.routing import PromptRouting, display_token


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
    token_hits = [
        content_probabilities(routing).argmax(dim=-1) == label for routing, label in zip(routings, labels, strict=True)
    ]
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


def routing_to_dict(routings: Sequence[PromptRouting], summary: RoutingSummary, names: Sequence[str]) -> dict[str, Any]:
    """Per-prompt grids and shares plus the overall summary, as JSON-ready data (content tokens only)."""
    experts = summary.utilisation.shape[-1]
    return {
        "layers": summary.utilisation.shape[0],
        "experts": experts,
        "expert_names": list(names),
        "prompts": [
            {
                "text": routing.prompt.text,
                "tokens": content_tokens(routing),
                "token_texts": _content(routing, routing.texts),
                "top_expert": content_probabilities(routing).argmax(dim=-1).tolist(),
                "expert_share": summarise_routing([routing]).utilisation.tolist(),
                "preferred_expert": preferred_expert(routing),
            }
            for routing in routings
        ],
        "utilisation": {
            "by_layer": summary.utilisation.tolist(),
            "overall": summary.overall_utilisation.tolist(),
        },
        "mean_entropy": summary.mean_entropy,
        "max_entropy": math.log(experts),
    }


def content_tokens(routing: PromptRouting) -> list[str]:
    """The raw pieces of the prompt's own tokens (special tokens left out)."""
    return _content(routing, routing.tokens)


def content_texts(routing: PromptRouting) -> list[str]:
    """What the prompt's own tokens stand for, as `display_token` shows them."""
    return [display_token(text) for text in _content(routing, routing.texts)]


def _content(routing: PromptRouting, values: Sequence[str]) -> list[str]:
    return [value for value, keep in zip(values, routing.prompt.content_mask.tolist(), strict=True) if keep]


def accuracy_to_dict(
    accuracy: RoutingAccuracy, routings: Sequence[PromptRouting], labels: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    return {
        "prompt_accuracy": accuracy.prompt_accuracy,
        "token_accuracy": accuracy.token_accuracy,
        "token_accuracy_by_layer": list(accuracy.token_accuracy_by_layer),
        "by_expert": [
            {
                "expert": expert,
                "name": names[expert],
                "prompt_accuracy": accuracy.prompt_accuracy_by_expert[expert],
                "token_accuracy": accuracy.token_accuracy_by_expert[expert],
            }
            for expert in accuracy.prompt_accuracy_by_expert
        ],
        "prompts": [
            {"text": routing.prompt.text, "label": label, "preferred_expert": preferred_expert(routing)}
            for routing, label in zip(routings, labels, strict=True)
        ],
    }
