"""Helpers shared by the test modules: configs on disk and running the CLI in-process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner, Result

from frankenmoe.cli import app

DEFAULT_PROMPTS = (
    ("write python code", "a function that sorts a list"),
    ("once upon a time", "tell me a story about a dragon"),
    ("solve the equation", "what is 12 times 7"),
    ("hello, how are you?", "let's chat about the weather"),
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
"""Llama 3.1's rope scaling, with an original context short enough for the toy models to run past."""


def write_config(
    path: Path,
    base: Path | str,
    experts: Sequence[Path | str],
    *,
    prompts: Sequence[Sequence[str]] | None = None,
    **top_level: Any,
) -> Path:
    """A merge config with one expert per entry of `experts`, each with default positive prompts.

    It names `gate_mode: hidden` unless told otherwise (`gate_mode=None` leaves the key out, so the
    default runs): the tests that use it were written for that mode, which was the default until the
    default became fit (issue 28).
    """
    chosen = prompts if prompts is not None else DEFAULT_PROMPTS
    top_level.setdefault("gate_mode", "hidden")
    if top_level["gate_mode"] is None:
        del top_level["gate_mode"]
    data: dict[str, Any] = {
        "base_model": str(base),
        "experts": [
            {"source_model": str(expert), "positive_prompts": list(chosen[index % len(chosen)])}
            for index, expert in enumerate(experts)
        ],
        **top_level,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str | Path) -> Result:
    """Run the frankenmoe CLI in this process and return its result (exit code, output)."""
    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
