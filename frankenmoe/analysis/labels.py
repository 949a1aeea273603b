"""The prompts `frankenmoe route` reads: a prompts file, a labels file mapping experts (index or source_model
name) to the prompts that should reach them, and the experts' display names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from frankenmoe.errors import ConfigError


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"Prompts file {path} cannot be read ({error}). Pass a UTF-8 text file, one prompt a line."
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"Prompts file {path} holds no prompts. Write one prompt per line.")
    return prompts


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    expert: int


def load_labels(path: Path, expert_count: int, expert_sources: Sequence[str] = ()) -> list[LabelledPrompt]:
    """Read a YAML mapping of expert (index or name) -> prompts that should route to it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Labels file {path} cannot be read ({error}).") from None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"Labels file {path} is not valid YAML ({str(error).splitlines()[0]}). It must map each expert "
            "(an index such as 0, or a source_model name) to a list of prompts."
        ) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"Labels file {path} must be a non-empty YAML mapping of expert (index or source_model name) to a list "
            'of prompts, e.g.\n0:\n  - "Write a Python function"\n1:\n  - "Once upon a time"'
        )
    labelled: list[LabelledPrompt] = []
    for key, prompts in data.items():
        expert = resolve_expert(key, expert_count, expert_sources, str(path))
        texts = [prompts] if isinstance(prompts, str) else prompts
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(text, str) and text.strip() for text in texts)
        ):
            raise ConfigError(
                f"Labels file {path}: the value of {key!r} must be a prompt or a list of non-empty prompts."
            )
        labelled.extend(LabelledPrompt(text, expert) for text in texts)
    return labelled


def resolve_expert(key: object, expert_count: int, expert_sources: Sequence[str], where: str) -> int:
    """An expert index from an integer, or from a name matching one expert's source_model.

    A name matches a source_model when it is the whole reference or its last path component
    (`code-expert` matches `./models/code-expert` and `org/code-expert@main`).
    """
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < expert_count:
            raise ConfigError(
                f"{where}: expert {key} does not exist; the checkpoint has experts 0 to {expert_count - 1}."
            )
        return key
    name = str(key)
    matches = [index for index, source in enumerate(expert_sources) if name in (source, _short_name(source))]
    if len(matches) == 1:
        return matches[0]
    if not expert_sources:
        raise ConfigError(
            f"{where}: expert {name!r} is a name, but this checkpoint has no frankenmoe model card with a merge "
            f"recipe to match names against. Use expert indices 0 to {expert_count - 1} instead."
        )
    known = ", ".join(f"{index} = {source}" for index, source in enumerate(expert_sources))
    problem = "matches several experts" if matches else "matches no expert"
    raise ConfigError(f"{where}: expert {name!r} {problem}. Use an index or a source_model name: {known}.")


def _short_name(source: str) -> str:
    return source.split("@")[0].rstrip("/").rsplit("/", 1)[-1]


def expert_names(expert_count: int, expert_sources: Sequence[str] = ()) -> list[str]:
    """Display names: the source_model of each expert where the card names them, else `expert N`."""
    if len(expert_sources) == expert_count:
        return list(expert_sources)
    return [f"expert {index}" for index in range(expert_count)]
