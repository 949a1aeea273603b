"""Held-out perplexity of a dense or Mixtral model, the routing it chose, and the gain a merge kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class Evaluation:
    perplexity: float
    tokens: int
    top1_share: tuple[float, ...] | None
    """For a MoE: the share of (token, layer) pairs whose top-1 expert is each expert; None for a dense model."""


def load_model(folder: Path) -> torch.nn.Module:
    """Dense Llama/Mistral or Mixtral, in float32 for the evaluation."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> Evaluation:
    """Perplexity over every next-token prediction in `blocks` ([N, T]); routing counted by hooks on the gates."""
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    expert_count = int(gates[0].weight.shape[0]) if gates else 0
    top1_counts = torch.zeros(expert_count, dtype=torch.long)

    def count_top1(_module: torch.nn.Module, _inputs: tuple[torch.Tensor, ...], output: tuple) -> None:
        nonlocal top1_counts
        logits = output[0] if isinstance(output, tuple) else output
        top1_counts += torch.bincount(logits.argmax(dim=-1).flatten(), minlength=expert_count)

    hooks = [gate.register_forward_hook(count_top1) for gate in gates]
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(blocks), batch_size):
                batch = blocks[start : start + batch_size]
                logits = model(input_ids=batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_loss += float(loss)
                total_tokens += targets.numel()
    finally:
        for hook in hooks:
            hook.remove()
    shares = None
    if gates:
        shares = tuple(float(value) for value in top1_counts.float() / top1_counts.sum().clamp_min(1))
    return Evaluation(math.exp(total_loss / total_tokens), total_tokens, shares)


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
