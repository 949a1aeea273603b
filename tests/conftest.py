"""Session-wide tiny models: a Mistral base, three MLP "fine-tunes" of it, and a tied-embedding Llama."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from frankenmoe.toymodels import write_toy_model


@dataclass(frozen=True)
class TinyModels:
    base: Path
    experts: tuple[Path, ...]
    llama_tied: Path
    llama_tied_experts: tuple[Path, ...]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    base = write_toy_model(root / "base")
    experts = tuple(write_toy_model(root / f"expert{index}", mlp_seed=index) for index in (1, 2, 3))
    llama = write_toy_model(root / "llama-tied", model_type="llama", tie_word_embeddings=True, base_seed=7)
    llama_experts = tuple(
        write_toy_model(
            root / f"llama-tied-expert{index}",
            model_type="llama",
            tie_word_embeddings=True,
            base_seed=7,
            mlp_seed=70 + index,
        )
        for index in (1, 2)
    )
    return TinyModels(base, experts, llama, llama_experts)
