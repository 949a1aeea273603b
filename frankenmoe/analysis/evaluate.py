"""Is a merge any good: held-out perplexity per domain of a MoE checkpoint, its base and its experts.

Every model is streamed layer by layer with frankenmoe's own decoder (frankenmoe.decoder.decoder), the MoE as
`frankenmoe route` runs it (every layer's attention, router and experts, with the output
architecture's routing semantics), the base and the experts as dense models. Memory stays at one
layer's attention weights, one slice of one matrix per slice worker, and the activations of one batch
of windows, whatever the model's size.

The texts become token windows in windows.py, the models to compare are found in eval_models.py, and
perplexity.py scores one model on every window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.analysis.eval_models import ModelSpec, dense_model, resolve_models
from frankenmoe.analysis.perplexity import ModelScore, score_model, windows_per_batch
from frankenmoe.analysis.windows import DomainText, domain_windows
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import TensorLocation

DEFAULT_WINDOW = 256
"""Tokens per window: the quality benchmark's block length."""


@dataclass(frozen=True)
class EvaluatedModel:
    """A model that was scored: `role` is moe, base or expert; `names` every name it answers to (a
    folder named twice in the manifest, e.g. the base as an expert too, is scored once)."""

    names: tuple[str, ...]
    role: str
    reference: str
    path: Path
    scores: dict[str, ModelScore]


@dataclass(frozen=True)
class DomainResult:
    """One row of the table."""

    domain: str
    tokens: int
    moe_perplexity: float
    base_perplexity: float
    best_expert: str
    """The expert (or --model source) with the lowest perplexity on this domain."""
    best_expert_perplexity: float
    kept: float | None
    """(ppl_base - ppl_moe) / (ppl_base - ppl_best): 1 = the MoE keeps all of the best expert's gain over
    the base, 0 = none, negative = worse than the base; None when no expert beats the base here."""
    top1_share: tuple[float, ...]
    """The MoE's top-1 share per expert on this domain (see ModelScore)."""


@dataclass(frozen=True)
class EvaluationReport:
    checkpoint: Path
    window: int
    stride: int
    expert_names: tuple[str, ...]
    """The checkpoint's experts in order (their manifest references where known)."""
    models: tuple[EvaluatedModel, ...]
    domains: tuple[DomainResult, ...]

    def below(self, min_kept: float) -> list[DomainResult]:
        """Domains whose kept share is measurable and under `min_kept` (the CI gate)."""
        return [row for row in self.domains if row.kept is not None and row.kept < min_kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "window": self.window,
            "stride": self.stride,
            "expert_names": list(self.expert_names),
            "domains": [
                {
                    "domain": row.domain,
                    "tokens": row.tokens,
                    "moe_perplexity": row.moe_perplexity,
                    "base_perplexity": row.base_perplexity,
                    "best_expert": row.best_expert,
                    "best_expert_perplexity": row.best_expert_perplexity,
                    "kept": row.kept,
                    "top1_share": list(row.top1_share),
                }
                for row in self.domains
            ],
            "models": [
                {
                    "names": list(model.names),
                    "role": model.role,
                    "reference": model.reference,
                    "path": str(model.path),
                    "perplexity": {domain: score.perplexity for domain, score in model.scores.items()},
                }
                for model in self.models
            ],
        }


def gain_kept(base_perplexity: float, moe_perplexity: float, expert_perplexity: float) -> float | None:
    """Share of the expert's perplexity gain over the base that the MoE keeps; None without a gain."""
    gain = base_perplexity - expert_perplexity
    return None if gain <= 0 else (base_perplexity - moe_perplexity) / gain


def evaluate_checkpoint(
    checkpoint: Path,
    texts: Mapping[str, DomainText],
    models: Mapping[str, str] | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Score the MoE in `checkpoint`, its base and each expert on every domain of `texts` (see the module
    docstring); everything is checked before the first model runs."""
    stride = window if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(
            f"--window must be at least 2 and --stride between 1 and the window (got {window} and {stride})."
        )
    if not texts:
        raise ConfigError("No text to score. Pass --text NAME=FILE (repeatable), one per domain.")
    moe = load_checkpoint(checkpoint)
    limit = int(moe.config.get("max_position_embeddings") or window)
    if window > limit:
        raise ConfigError(
            f"--window {window} is longer than the model's context ({limit} tokens). Use a smaller --window."
        )
    windows = {name: domain_windows(checkpoint, name, text, window, stride) for name, text in texts.items()}
    specs = resolve_models(checkpoint, models or {})
    if not any(spec.role == "base" for spec in specs):
        raise ModelError(f"{checkpoint}'s manifest names no base model. Name it with --model base=REF.")
    if not any(spec.role == "expert" for spec in specs):
        raise ConfigError("No expert to compare with: the manifest lists none and no --model NAME=REF names one.")
    vocab_size = int(moe.config["vocab_size"])
    distinct: dict[Path, list[ModelSpec]] = {}
    for spec in specs:
        distinct.setdefault(spec.path.resolve(), []).append(spec)
    dense = {path: dense_model(group[0], vocab_size) for path, group in distinct.items()}

    def scored(name: str, config: dict[str, Any], tensors: Mapping[str, TensorLocation]) -> dict[str, ModelScore]:
        from tqdm import tqdm

        batches = math.ceil(sum(len(item.ids) for item in windows.values()) / windows_per_batch(config, window))
        total = batches * int(config["num_hidden_layers"])
        with tqdm(total=total, desc=f"eval {name}", unit="layer", disable=not progress) as bar:
            return score_model(config, tensors, windows, device, bar.update)

    evaluated = [EvaluatedModel(("moe",), "moe", str(checkpoint), checkpoint, scored("moe", moe.config, moe.tensors))]
    for path, group in distinct.items():
        names = tuple(spec.name for spec in group)
        role = "base" if any(spec.role == "base" for spec in group) else "expert"
        scores = scored("/".join(names), dense[path].config, dense[path].tensors)
        evaluated.append(EvaluatedModel(names, role, group[0].reference, group[0].path, scores))
    expert_names = tuple(spec.name for spec in specs if spec.role == "expert")
    return EvaluationReport(
        checkpoint,
        window,
        stride,
        _checkpoint_expert_names(specs, moe.num_experts),
        tuple(evaluated),
        tuple(_domain_row(domain, evaluated, expert_names) for domain in windows),
    )


def _checkpoint_expert_names(specs: Sequence[ModelSpec], count: int) -> tuple[str, ...]:
    by_name = {spec.name: spec.reference for spec in specs}
    return tuple(by_name.get(f"expert{index}", f"expert {index}") for index in range(count))


def _domain_row(domain: str, evaluated: Sequence[EvaluatedModel], expert_names: Sequence[str]) -> DomainResult:
    moe = evaluated[0].scores[domain]
    base = next(model for model in evaluated if "base" in model.names).scores[domain]
    perplexity = {name: model.scores[domain].perplexity for model in evaluated for name in model.names}
    best = min(expert_names, key=lambda name: perplexity[name])
    return DomainResult(
        domain=domain,
        tokens=moe.tokens,
        moe_perplexity=moe.perplexity,
        base_perplexity=base.perplexity,
        best_expert=best,
        best_expert_perplexity=perplexity[best],
        kept=gain_kept(base.perplexity, moe.perplexity, perplexity[best]),
        top1_share=moe.top1_share or (),
    )
