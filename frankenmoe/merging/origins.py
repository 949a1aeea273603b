"""Where a plan's tensors come from, in words: what the dry run and the model card say about them."""

from __future__ import annotations

from frankenmoe.merging.plan import MergePlan
from frankenmoe.routers.request import NEUTRAL_GATE


def shared_weights_origin(plan: MergePlan) -> str:
    """How the non-expert tensors (attention, norms, embeddings, head) were made, in one line."""
    merges = plan.trunk_merges
    if not merges:
        return f"copied from the base model {plan.base.reference}"
    return f"every one of {len(merges)} merged from the base and the experts, {next(iter(merges.values())).describe()}"


def computed_origin(plan: MergePlan, kind: str) -> str:
    """How a computed tensor's rows are made, for the dry run and the model card."""
    mode = plan.config.gate_mode
    if kind == "router":
        return f"gate mode {mode} from the experts' prompts" if plan.config.needs_prompts else f"gate mode {mode}"
    shared = plan.config.shared_experts[0] if plan.config.shared_experts else None
    if shared is None:
        return f"neutral ({NEUTRAL_GATE} everywhere; no shared expert: its slot is one all-zero row, adding nothing)"
    if not plan.config.needs_prompts:
        return f"neutral ({NEUTRAL_GATE} everywhere: gate mode {mode} uses no prompts; sigmoid = 0.5 on every token)"
    if not shared.positive_prompts:
        return f"neutral ({NEUTRAL_GATE} everywhere: the shared expert has no positive_prompts; sigmoid = 0.5 on every token)"
    return f"gate mode {mode} from the shared expert's prompts, as one more expert, scaled like the routers"
