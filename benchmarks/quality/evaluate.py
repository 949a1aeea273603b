"""The gain a merge kept, from perplexities (computed by frankenmoe.analysis.perplexity, see run.evaluate_folder)."""

from __future__ import annotations


def gain_retained(base_perplexity: float, moe_perplexity: float, expert_perplexity: float) -> float:
    """Share of the expert's perplexity gain over the base that the MoE keeps: 1 = all of it, 0 = none,
    negative = worse than the base, above 1 = better than the expert itself."""
    gain = base_perplexity - expert_perplexity
    if gain <= 0:
        raise ValueError(
            f"The expert (perplexity {expert_perplexity:.3f}) is no better than the base ({base_perplexity:.3f}); "
            "there is no gain to retain."
        )
    return (base_perplexity - moe_perplexity) / gain


def relative_change(base_perplexity: float, perplexity: float) -> float:
    """(ppl - ppl_base) / ppl_base: negative is better than the base."""
    return (perplexity - base_perplexity) / base_perplexity
