"""`frankenmoe route` on a checkpoint: the given prompts, a prompts file's and a labels file's, routed once each,
with their summary, accuracy where labelled, and a heatmap on request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.analysis.labels import expert_names, load_labels, read_prompts_file
from frankenmoe.analysis.plot import write_routing_heatmap
from frankenmoe.analysis.routing import PromptRouting, route_prompts
from frankenmoe.analysis.routing_stats import (
    RoutingAccuracy,
    RoutingSummary,
    accuracy_to_dict,
    content_texts,
    routing_accuracy,
    routing_to_dict,
    summarise_routing,
)
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.checkpoint.recipe import read_recipe
from frankenmoe.errors import ConfigError


@dataclass(frozen=True)
class RouteResult:
    """Where each prompt's tokens go: per-prompt routings, their summary, and accuracy when labelled."""

    routings: tuple[PromptRouting, ...]
    summary: RoutingSummary
    accuracy: RoutingAccuracy | None = None
    expert_names: tuple[str, ...] = ()
    """Each expert's source_model where the checkpoint's model card names them, else `expert N`."""
    labelled: tuple[tuple[PromptRouting, int], ...] = ()
    """The routings `accuracy` was measured on, each with the expert it should reach."""
    checkpoint: Path | None = None
    heatmap: Path | None = None
    """The PNG written with `png=`."""

    def shown_tokens(self) -> tuple[tuple[str, ...], ...]:
        """Each prompt's own tokens (special tokens left out) as text shows them: decoded, spaces made visible."""
        return tuple(tuple(content_texts(routing)) for routing in self.routings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: per-prompt grids and shares, the summary, and accuracy (null when unlabelled)."""
        data = {
            "checkpoint": str(self.checkpoint),
            **routing_to_dict(self.routings, self.summary, self.expert_names),
        }
        routings = [routing for routing, _ in self.labelled]
        labels = [label for _, label in self.labelled]
        accuracy = self.accuracy
        data["accuracy"] = None if accuracy is None else accuracy_to_dict(accuracy, routings, labels, self.expert_names)
        data["png"] = None if self.heatmap is None else str(self.heatmap)
        return data


NO_PROMPTS = (
    "No prompts to route. Pass --prompt TEXT (repeatable), --prompts-file FILE or --labels FILE "
    "(from Python: prompts, prompts_file or labels_file)."
)


def route_checkpoint(
    path: Path,
    texts: list[str],
    labels: Sequence[int] | None,
    device: torch.device,
    prompts_file: Path | str | None,
    labels_file: Path | str | None,
    png: Path | str | None,
) -> RouteResult:
    """Route `texts` (their `labels` checked to match them), then the prompts file's and the labels file's prompts
    not among them, through the checkpoint in `path`; see frankenmoe.route."""
    loaded = load_checkpoint(path)
    recipe = read_recipe(path)
    sources = recipe.expert_sources if recipe else ()
    if prompts_file is not None:
        texts += read_prompts_file(Path(prompts_file))
    from_file = [] if labels_file is None else load_labels(Path(labels_file), loaded.num_experts, sources)
    texts += list(dict.fromkeys(item.text for item in from_file if item.text not in texts))
    if not texts:
        raise ConfigError(NO_PROMPTS)
    routings = route_prompts(loaded, texts, device)
    by_text = {routing.prompt.text: routing for routing in routings}
    # `labels` are those of the first prompts (checked by the caller); the prompts file's and the labels file's follow.
    given = zip(routings, labels or (), strict=False)
    labelled = [*given, *((by_text[item.text], item.expert) for item in from_file)]
    accuracy = routing_accuracy(*zip(*labelled, strict=True)) if labelled else None
    summary = summarise_routing(routings)
    names = tuple(expert_names(loaded.num_experts, sources))
    if png is not None:
        write_routing_heatmap(Path(png), routings, summary, names)
    heatmap = None if png is None else Path(png)
    return RouteResult(tuple(routings), summary, accuracy, names, tuple(labelled), path, heatmap)
