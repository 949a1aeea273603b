"""Checking the public API's arguments before any work, with the messages the CLI gives (ConfigError): flags,
seeds, sizes, devices, prompts and build's config files."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from frankenmoe.errors import ConfigError
from frankenmoe.merging.plan import parse_size
from frankenmoe.merging.prepare import LoadedConfig, read_config_input, resolve_device

MAX_SEED = 2**64 - 1
"""torch generators take seeds up to 2**64 - 1."""


def check_flag(name: str, value: object) -> None:
    # "false" and 0 would otherwise be read as truthy or falsy by accident.
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, not {value!r} ({type(value).__name__}).")


def check_seed(value: object) -> int:
    """A seed torch takes: a whole number from 0 to MAX_SEED (not a bool, a float or text)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(
            f"seed {value!r} is not valid (--seed): use a whole number from 0 to {MAX_SEED} (the range torch's "
            "random generators take)."
        )
    return value


def check_size(value: object, what: str, name: str, minimum: int) -> int:
    """A byte count given as an int or as text such as "5GB" (parsed as the CLI parses it)."""
    if isinstance(value, str):
        if not math.isfinite(_size_number(value)):
            raise ConfigError(f"{what} {value!r} is not a size. Use a byte count or a value like 5GB, 500MB, 2GiB.")
        return parse_size(value, what, minimum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f'{name} {value!r} is not valid: give a whole number of bytes (an int) or text like "5GB", "500MiB".'
        )
    if value < minimum:
        raise ConfigError(f"{what} {value!r} must be at least {minimum} byte{'s' if minimum != 1 else ''}.")
    return value


def _size_number(text: str) -> float:
    # parse_size turns the number into an int; nan and inf must be refused before that, not crash it.
    try:
        return float(text.strip().upper().replace(" ", "").rstrip("KMGTIB"))
    except ValueError:
        return 0.0  # not a number at all: parse_size names the problem


def check_device(device: object) -> None:
    if not isinstance(device, str):
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for a specific GPU).")
    resolve_device(device)


def prompt_list(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    texts = list(prompts) if isinstance(prompts, Sequence) else None
    if texts is None or not all(isinstance(text, str) for text in texts):
        raise ConfigError(f"prompts must be a string or a list of strings, not {prompts!r}.")
    return texts


def config_file(config: object, index: int) -> Path:
    """The file `build` reads a config from: each output is named after its config file's stem."""
    if isinstance(config, (str, os.PathLike)):
        return Path(config)
    if isinstance(config, LoadedConfig) and config.source_path is not None:
        read_config_input(config)  # refuses one changed since it was loaded: build reads the file
        return config.source_path
    raise ConfigError(
        f"configs[{index}] is not a config file: build names each output after its config file "
        "(OUT_DIR/<file stem>), so it needs the file's path, or load_config's result for a file. Write the config "
        "to a .yaml file and pass that, or use merge() for a config held in memory."
    )
