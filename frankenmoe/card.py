"""The model card (README.md) written beside the checkpoint."""

from __future__ import annotations

from frankenmoe import __version__
from frankenmoe.config import PROMPT_GATE_MODES, MergeConfig
from frankenmoe.laser import LaserResult
from frankenmoe.plan import SAFETENSORS_TO_CONFIG_DTYPE, MergePlan
from frankenmoe.sources import weight_formats_summary

RECIPE_HEADING = "## Merge recipe"
LASER_HEADING = "## Laser rank reduction"


def model_card(plan: MergePlan, config_text: str, extra_sections: tuple[str, ...] = ()) -> str:
    config = plan.config
    expert_lines = "\n".join(
        f"| {index} | `{expert.reference}` | {', '.join(config.experts[index].positive_prompts) or '-'} |"
        for index, expert in enumerate(plan.experts)
    )
    sections = [
        f"---\nlibrary_name: transformers\ntags:\n- moe\n- frankenmoe\n- {plan.architecture.model_type}\n---\n",
        f"# {len(plan.experts)}-expert frankenMoE of `{plan.base.reference}`\n",
        f"Built with frankenmoe {__version__}: attention, embeddings and norms come from the base model "
        "`" + plan.base.reference + "`; each expert's MLP comes from its source model; routers were "
        f"initialised with gate mode `{config.gate_mode}`. No training was done.\n",
        "| | |\n|---|---|\n"
        f"| architecture | {plan.architecture.class_name} ({plan.layout.name} tensor layout; {plan.architecture_reason}) |\n"
        + (
            f"| shared expert | `{plan.shared_expert.reference}`; gate: {plan.computed_origin('shared_expert_gate')} |\n"
            if plan.shared_expert is not None
            else ""
        )
        + f"| routers | {plan.computed_origin('router')} |\n"
        f"| experts | {len(plan.experts)}, {config.experts_per_token} per token |\n"
        f"| parameters | {plan.total_parameters:,} total, {plan.active_parameters:,} active per token |\n"
        f"| dtype | {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]} |\n"
        f"| gate mode | {config.gate_mode} |\n"
        f"| router prompts | {router_summary(config)} |\n"
        f"| source weights | {weight_formats_summary((plan.base, *plan.experts))} |\n",
        "## Experts\n\n| # | source | positive prompts |\n|---|---|---|\n" + expert_lines + "\n",
        *extra_sections,
        f"{RECIPE_HEADING}\n\n```yaml\n{config_text.rstrip()}\n```\n",
    ]
    return "\n".join(sections)


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
