"""The routing check: whether each expert's own positive prompts route to it, right after a merge, as terminal
lines and as a model-card section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from frankenmoe.analysis.routing import route_prompts
from frankenmoe.analysis.routing_stats import RoutingAccuracy, preferred_expert, routing_accuracy
from frankenmoe.checkpoint.folder import Checkpoint
from frankenmoe.config.schema import ExpertConfig
from frankenmoe.routers.prompts import TOKENIZER_MARKERS


@dataclass(frozen=True)
class RoutingCheck:
    """Whether each expert's own positive prompts route to it, right after a merge."""

    expert_sources: tuple[str, ...]
    prompts_per_expert: dict[int, int]
    hits_per_expert: dict[int, int]
    accuracy: RoutingAccuracy

    @property
    def hits(self) -> int:
        return sum(self.hits_per_expert.values())

    @property
    def prompts(self) -> int:
        return sum(self.prompts_per_expert.values())


def check_routing(
    checkpoint: Checkpoint,
    experts: Sequence[ExpertConfig],
    device: torch.device | None,
    in_memory: Mapping[str, torch.Tensor] | None = None,
) -> RoutingCheck:
    labelled = [(text, index) for index, expert in enumerate(experts) for text in expert.positive_prompts]
    routings = route_prompts(checkpoint, [text for text, _ in labelled], device, in_memory=in_memory)
    labels = [label for _, label in labelled]
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    for routing, label in zip(routings, labels, strict=True):
        counts[label] = counts.get(label, 0) + 1
        hits[label] = hits.get(label, 0) + (preferred_expert(routing) == label)
    return RoutingCheck(
        expert_sources=tuple(expert.source_model for expert in experts),
        prompts_per_expert=counts,
        hits_per_expert=hits,
        accuracy=routing_accuracy(routings, labels),
    )


def routing_check_skip_reason(folder: Path, experts: Sequence[ExpertConfig]) -> str | None:
    if not any(expert.positive_prompts for expert in experts):
        return "routing check skipped: no expert has positive prompts to route."
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        return "routing check skipped: the checkpoint has no tokenizer (the base model folder has none)."
    return None


def routing_check_lines(check: RoutingCheck) -> list[str]:
    """The check as a few lines for the terminal."""
    accuracy = check.accuracy
    lines = [
        f"routing check: {check.hits}/{check.prompts} positive prompts route to their own expert; "
        f"{accuracy.token_accuracy:.0%} of tokens pick it first (by layer: "
        + ", ".join(f"{value:.0%}" for value in accuracy.token_accuracy_by_layer)
        + ")"
    ]
    for expert, count in check.prompts_per_expert.items():
        lines.append(
            f"  expert {expert} ({check.expert_sources[expert]}): {check.hits_per_expert[expert]}/{count} prompts, "
            f"{accuracy.token_accuracy_by_expert[expert]:.0%} of tokens"
        )
    return lines


def routing_check_markdown(check: RoutingCheck, reproducible_with_route: bool = True) -> str:
    """The check as a model-card section; `reproducible_with_route` is false for an output `route` cannot read
    (a GGUF file), whose card then names no command to reproduce it."""
    accuracy = check.accuracy
    rows = "\n".join(
        f"| {expert} | `{check.expert_sources[expert]}` | {check.hits_per_expert[expert]}/{count} | "
        f"{accuracy.token_accuracy_by_expert[expert]:.0%} |"
        for expert, count in check.prompts_per_expert.items()
    )
    by_layer = ", ".join(f"{value:.0%}" for value in accuracy.token_accuracy_by_layer)
    return (
        "## Routing check\n\n"
        "Each expert's positive prompts were run through this checkpoint right after the merge. A prompt reaches "
        "an expert when that expert has the largest router probability summed over all layers and tokens; the "
        "token share counts (token, layer) pairs whose top-1 expert is the prompt's own.\n\n"
        "| # | expert | prompts reaching it | tokens choosing it first |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Overall: {check.hits}/{check.prompts} prompts, {accuracy.token_accuracy:.0%} of tokens "
        f"(by layer: {by_layer}).{' Reproduce with `frankenmoe route OUT --labels FILE`.' if reproducible_with_route else ''}\n"
    )
