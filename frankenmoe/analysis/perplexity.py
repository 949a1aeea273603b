"""Perplexity of one model (a MoE checkpoint or a dense model) on token windows, streamed a layer at a time,
and for a MoE the share of new tokens each expert gets first."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.analysis.windows import TokenWindows
from frankenmoe.architectures.tables import SOURCE_FAMILIES
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.sources.model import read_model_config
from frankenmoe.sources.weights import index_tensors

BATCH_BYTES = 256 * 1024 * 1024
"""Float32 activations one batch of windows may take in the widest matrix product (the MLP's
intermediate); each batch streams the whole model once, so larger batches read the model fewer times."""


@dataclass(frozen=True)
class ModelScore:
    """One model on one domain."""

    perplexity: float
    tokens: int
    """Next-token predictions scored."""
    top1_share: tuple[float, ...] | None
    """For a MoE: the share of (new token, layer) pairs whose top-1 expert is each expert; None when dense."""


def windows_per_batch(config: Mapping[str, Any], window: int) -> int:
    """How many windows go through the model together (see BATCH_BYTES); one at least."""
    widths = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "hidden_size")
    widest = max(int(config.get(key) or 0) for key in widths)
    # The MLP holds its gate and up products and their concatenation: about three intermediates per token.
    return max(1, BATCH_BYTES // (3 * 4 * widest * window))


def score_model(
    config: dict[str, Any],
    tensors: Mapping[str, TensorLocation],
    windows: Mapping[str, TokenWindows],
    device: torch.device | None = None,
    on_layer: Callable[[], None] | None = None,
) -> dict[str, ModelScore]:
    """Perplexity (and for a MoE the top-1 share) of one model on every domain's windows, streamed.

    The windows of all domains go through the model in batches (`windows_per_batch`); every layer of
    a batch is one `forward_layer` call over all its windows. `on_layer` is called after each layer of
    each batch (progress).
    """
    decoder = StreamedDecoder(config, tensors, device or torch.device("cpu"))
    items = [(domain, index) for domain, domain_windows in windows.items() for index in range(len(domain_windows.ids))]
    per_batch = windows_per_batch(config, next(iter(windows.values())).ids.shape[1])
    experts = int(config.get(decoder.moe.expert_count_key) or 0) if decoder.moe is not None else 0
    losses = dict.fromkeys(windows, 0.0)
    counts = {domain: torch.zeros(experts, dtype=torch.long) for domain in windows}
    chunk = 4 * int(config["hidden_size"])  # tokens per head pass: keeps [tokens, head slice] logits near 16 MiB
    for first in range(0, len(items), per_batch):
        batch = items[first : first + per_batch]
        ids = [windows[domain].ids[index] for domain, index in batch]
        new_from = [windows[domain].new_from[index] for domain, index in batch]
        hidden = [decoder.embed(window_ids) for window_ids in ids]
        for layer in range(decoder.num_layers):
            layer_pass = decoder.forward_layer(layer, hidden)
            hidden = layer_pass.hidden
            for (domain, _), start, logits in zip(batch, new_from, layer_pass.router_logits or [], strict=False):
                counts[domain] += torch.bincount(logits[start:].argmax(dim=-1).cpu(), minlength=experts)
            if on_layer is not None:
                on_layer()
        states = torch.cat([state[0, max(1, start) - 1 : -1] for state, start in zip(hidden, new_from, strict=True)])
        targets = torch.cat([window_ids[max(1, start) :] for window_ids, start in zip(ids, new_from, strict=True)])
        with torch.no_grad():
            log_probabilities = torch.cat(
                [
                    decoder.target_log_probabilities(
                        states[at : at + chunk], targets[at : at + chunk].to(decoder.device)
                    )
                    for at in range(0, len(targets), chunk)
                ]
            ).cpu()
        scored_lengths = [len(window_ids) - max(1, start) for window_ids, start in zip(ids, new_from, strict=True)]
        for (domain, _), window_scores in zip(batch, log_probabilities.split(scored_lengths), strict=True):
            losses[domain] -= float(window_scores.double().sum())
    scores = {}
    for domain, domain_windows in windows.items():
        total = counts[domain].sum()
        shares = tuple(float(count) / float(total) for count in counts[domain]) if experts and total else None
        scores[domain] = ModelScore(math.exp(losses[domain] / domain_windows.scored), domain_windows.scored, shares)
    return scores


def score_folder(
    folder: Path, windows: Mapping[str, TokenWindows], device: torch.device | None = None
) -> dict[str, ModelScore]:
    """`score_model` on the model in `folder`: a MoE checkpoint of any output architecture, or a dense model."""
    config = read_model_config(str(folder), folder)
    if str(config.get("model_type")) in SOURCE_FAMILIES:
        return score_model(config, index_tensors(str(folder), folder), windows, device)
    checkpoint = load_checkpoint(folder)
    return score_model(checkpoint.config, checkpoint.tensors, windows, device)
