"""The merge recipe a frankenmoe model card carries: how a card is recognised, and the recipe read back from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPE_HEADING = "## Merge recipe"
CARD_MARKS = ("Built with frankenmoe", RECIPE_HEADING)
"""Two phrases of every frankenmoe model card (card.py); another tool's README.md has not both."""


@dataclass(frozen=True)
class MergeRecipe:
    """The merge config found in a frankenmoe model card."""

    text: str
    expert_sources: tuple[str, ...]
    """Each expert's `source_model`, in expert order (empty when the YAML cannot be read)."""


def read_recipe(folder: Path) -> MergeRecipe | None:
    """The YAML block under "## Merge recipe" in the folder's README.md, if frankenmoe wrote one."""
    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = re.search(re.escape(RECIPE_HEADING) + r"\s*```ya?ml\n(.*?)\n```", text, flags=re.DOTALL)
    if match is None:
        return None
    recipe_text = match.group(1)
    return MergeRecipe(recipe_text, _expert_sources(recipe_text))


def _expert_sources(recipe_text: str) -> tuple[str, ...]:
    # Lenient on purpose: a card from another frankenmoe version may not validate, but its names still help.
    try:
        data = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return ()
    experts = data.get("experts") if isinstance(data, dict) else None
    if not isinstance(experts, list):
        return ()
    sources = [expert.get("source_model") if isinstance(expert, dict) else None for expert in experts]
    return tuple(str(source) for source in sources) if all(sources) else ()
