"""The model card (README.md) written beside the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from frankenmoe import __version__
from frankenmoe.checkpoint.recipe import RECIPE_HEADING
from frankenmoe.config.constants import PROMPT_GATE_MODES
from frankenmoe.config.schema import MergeConfig
from frankenmoe.io.safetensors import SAFETENSORS_TO_CONFIG_DTYPE
from frankenmoe.merging.laser_plan import LaserResult
from frankenmoe.merging.origins import computed_origin, shared_weights_origin
from frankenmoe.merging.plan import MergePlan
from frankenmoe.sources.model import SourceModel, weight_formats_summary
from frankenmoe.sources.resolve import cached_repo_id

LASER_HEADING = "## Laser rank reduction"
LORA_HEADING = "## LoRA adapters"


def model_card(plan: MergePlan, config_text: str, extra_sections: tuple[str, ...] = ()) -> str:
    config = plan.config
    expert_lines = "\n".join(
        f"| {index} | `{expert.reference}` | {', '.join(config.experts[index].positive_prompts) or '-'} |"
        for index, expert in enumerate(plan.experts)
    )
    sections = [
        card_header(plan),
        f"# {len(plan.experts)}-expert frankenMoE of `{plan.base.reference}`\n",
        f"Built with frankenmoe {__version__}: attention, embeddings and norms "
        + (
            f"come from the base model `{plan.base.reference}`"
            if not plan.trunk_merges
            else f"are a {plan.config.shared_weights.method} merge of the base model `{plan.base.reference}` and the experts"
        )
        + "; each expert's MLP comes from its source model; routers were "
        f"initialised with gate mode `{config.gate_mode}`{' (the default)' if config.gate_mode_defaulted else ''}. "
        f"No training was done.{_local_sources_note(plan)}\n",
        "| | |\n|---|---|\n"
        f"| architecture | {plan.architecture.class_name} ({plan.layout.name} tensor layout; {plan.architecture_reason}) |\n"
        + (
            f"| shared expert | `{plan.shared_expert.reference}`; gate: {computed_origin(plan, 'shared_expert_gate')} |\n"
            if plan.shared_expert is not None
            else ""
        )
        + f"| routers | {computed_origin(plan, 'router')} |\n"
        + f"| shared weights | {shared_weights_origin(plan)} |\n"
        f"| experts | {len(plan.experts)}, {config.experts_per_token} per token |\n"
        f"| parameters | {plan.total_parameters:,} total, {plan.active_parameters:,} active per token |\n"
        f"| dtype | {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]} |\n"
        f"| gate mode | {config.gate_mode_description} |\n"
        f"| router prompts | {router_summary(config)} |\n"
        f"| source weights | {weight_formats_summary((plan.base, *plan.experts))} |\n",
        "## Experts\n\n| # | source | positive prompts |\n|---|---|---|\n" + expert_lines + "\n",
        *vocabulary_sections(plan),
        *lora_sections(plan),
        *extra_sections,
        f"{RECIPE_HEADING}\n\n```yaml\n{config_text.rstrip()}\n```\n",
    ]
    return "\n".join(sections)


def card_header(plan: MergePlan) -> str:
    """The YAML metadata block the Hugging Face hub reads from a model card.

    `base_model` lists, by repo id, every source that was resolved from a Hugging Face cache (base first,
    each once), with `base_model_relation: merge` as the hub asks of merges. Sources given as local
    folders are left out: the hub accepts only repo ids there, and a folder does not say which repo it
    was downloaded from. The card's text and Experts table still name them.
    """
    sources = _sources(plan)
    metadata: dict[str, Any] = {"library_name": "transformers"}
    repo_ids = _unique(
        repo_id for repo_id in (cached_repo_id(source.path) for source in sources) if repo_id is not None
    )
    if repo_ids:
        metadata["base_model"] = repo_ids
        metadata["base_model_relation"] = "merge"
    families = (plan.architecture.model_type, *(source.model_type for source in sources))
    metadata["tags"] = _unique(("moe", "frankenmoe", "merge", *families))
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"


def _sources(plan: MergePlan) -> tuple[SourceModel, ...]:
    shared = () if plan.shared_expert is None else (plan.shared_expert,)
    return (plan.base, *plan.experts, *shared)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _local_sources_note(plan: MergePlan) -> str:
    local = _unique(source.reference for source in _sources(plan) if cached_repo_id(source.path) is None)
    if not local:
        return ""
    return (
        f" The {len(local)} source(s) given as local folders are not in the metadata's `base_model`, which takes "
        "Hugging Face repo ids only."
    )


def vocabulary_sections(plan: MergePlan) -> tuple[str, ...]:
    """A note on experts whose vocabulary differs from the base's; no section when none does."""
    base_size = plan.base.shape.vocab_size
    labelled = _labelled_experts(plan)
    rows = "\n".join(
        f"| {label} | `{expert.reference}` | {expert.shape.vocab_size} | "
        f"{abs(expert.shape.vocab_size - base_size)} {'added' if expert.shape.vocab_size > base_size else 'fewer'} |"
        for label, expert in labelled
        if expert.shape.vocab_size != base_size
    )
    if not rows:
        return ()
    return (
        f"## Vocabulary\n\nThe merged model has the base model's tokenizer and embeddings ({base_size} tokens). "
        "These experts were fine-tuned with a different vocabulary; only their MLPs were merged, so the model "
        "works. Tokens an expert added (often its chat template's special tokens) are not in the tokenizer and "
        "cannot be written; tokens the base has beyond an expert's vocabulary were never seen by that expert.\n\n"
        "| # | expert | vocabulary | tokens |\n|---|---|---|---|\n" + rows + "\n",
    )


def lora_sections(plan: MergePlan) -> tuple[str, ...]:
    """The experts given as model+adapter: each adapter, its rank and scale, and what of it was left out;
    no section when no expert has an adapter."""
    labelled = _labelled_experts(plan)
    rows = "\n".join(
        f"| {label} | `{expert.reference}` | {expert.adapter.trained_on or '-'} | {expert.adapter.ranks}"
        f"{' (rslora)' if expert.adapter.use_rslora else ''} | {expert.adapter.scales} | {len(expert.adapter.deltas)} "
        f"| {expert.adapter.left_out_summary() or '-'} |"
        for label, expert in labelled
        if expert.adapter is not None
    )
    if not rows:
        return ()
    return (
        f"{LORA_HEADING}\n\nThese experts are a model with a PEFT LoRA adapter applied. Each MLP matrix the adapter "
        "adapts was written as W + scale · (B @ A), computed in float32 and cast once, with scale = lora_alpha / r "
        "(lora_alpha / √r with rslora). What an adapter adapts outside the MLP is not in this model: its attention, "
        "embeddings and head are the base model's, shared by every expert.\n\n"
        "| # | expert (model+adapter) | adapter trained on | rank | scale | MLP matrices | not carried |\n"
        "|---|---|---|---|---|---|---|\n" + rows + "\n",
    )


def router_summary(config: MergeConfig) -> str:
    """What the routers were built from, in one line (model card and dry run)."""
    if config.gate_mode not in PROMPT_GATE_MODES:
        return "none (random rows)"
    positive = sum(len(expert.positive_prompts) for expert in config.experts)
    negative = sum(len(expert.negative_prompts) for expert in config.experts)
    summary = f"{positive} positive, {negative} negative"
    tokens = config.router.continuation_tokens
    if tokens:
        summary += f"; each continued by up to {tokens} tokens the base model writes after it (greedy)"
    return summary


def laser_sections(results: tuple[LaserResult, ...]) -> tuple[str, ...]:
    """A table of every matrix a `laser` block considered; no section when there was no laser block."""
    if not results:
        return ()
    rows = "\n".join(
        f"| `{result.group}` | `{result.tensor}` | {result.snr:.4g} | {result.rank_before} | {result.rank_after} "
        f"| {'yes' if result.reduced else 'no'} | {result.note} |"
        for result in results
    )
    return (
        f"{LASER_HEADING}\n\nEvery matrix a `laser` block considered. SNR is the sum of the singular values above "
        "the noise threshold over the sum of those below it; a reduced matrix is replaced by its truncated SVD, "
        "keeping `rank after` singular values.\n\n"
        "| block | tensor | SNR | rank before | rank after | reduced | note |\n|---|---|---|---|---|---|---|\n"
        + rows
        + "\n",
    )


def _labelled_experts(plan: MergePlan) -> list[tuple[str, SourceModel]]:
    """Each expert's model under the label the card's tables give it: its index, or "shared"."""
    labelled = [(str(index), expert) for index, expert in enumerate(plan.experts)]
    if plan.shared_expert is not None:
        labelled.append(("shared", plan.shared_expert))
    return labelled
