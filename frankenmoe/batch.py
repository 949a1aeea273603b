"""`frankenmoe build`: several configs into one folder each, skipping outputs that are up to date.

An output is up to date when its manifest records the same normalised config, tool version,
byte-changing options and source fingerprints as the current ones (sizes and safetensors header
hashes of every source weight file, or their full sha256 when the build recorded them). Configs
run one after another: a merge is bound by the disk, so two at once would each take about twice
as long and hold twice the page cache. Split a batch across CI jobs instead (one config per job).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from frankenmoe import __version__
from frankenmoe.errors import ConfigError, FrankenMoEError
from frankenmoe.manifest import normalised_config_sha256, read_manifest, source_record
from frankenmoe.pipeline import MergeOptions, execute_merge, load_sources, prepare_merge, read_config_input

logger = logging.getLogger("frankenmoe")

BUILT, UP_TO_DATE, FAILED = "built", "up to date", "failed"


@dataclass(frozen=True)
class BuildOutcome:
    """One config of a batch: where it went, what happened, how long it took, and why."""

    config: Path
    out: Path
    status: str
    seconds: float
    output_bytes: int = 0
    reason: str = ""
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": str(self.config),
            "out": str(self.out),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "output_bytes": self.output_bytes,
            "reason": self.reason,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class BuildReport:
    outcomes: tuple[BuildOutcome, ...]

    @property
    def failed(self) -> tuple[BuildOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.status == FAILED)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, else the first failure's exit code."""
        return self.failed[0].exit_code if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        counts = {status: sum(o.status == status for o in self.outcomes) for status in (BUILT, UP_TO_DATE, FAILED)}
        return {"outcomes": [outcome.to_dict() for outcome in self.outcomes], "counts": counts, "exit_code": self.exit_code}


def build_configs(
    configs: Sequence[Path], out_dir: Path, options: MergeOptions, *, rebuild: bool = False, fail_fast: bool = False
) -> BuildReport:
    """Merge each config into `out_dir/<config stem>`; a failure stops the rest only with `fail_fast`."""
    stems = [config.stem for config in configs]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise ConfigError(
            f"Several configs share the name {duplicates[0]!r}, so they would build into the same folder "
            f"{out_dir / duplicates[0]}. Rename them so each config's file name is unique."
        )
    outcomes: list[BuildOutcome] = []
    for config in configs:
        outcome = _build_one(config, out_dir / config.stem, options, rebuild)
        logger.info("%s: %s%s", config, outcome.status, f" ({outcome.reason})" if outcome.reason else "")
        outcomes.append(outcome)
        if outcome.status == FAILED and fail_fast:
            break
    return BuildReport(tuple(outcomes))


def _build_one(config: Path, out: Path, options: MergeOptions, rebuild: bool) -> BuildOutcome:
    started = time.monotonic()
    try:
        stale = "--rebuild" if rebuild else stale_reason(config, out, options)
        if stale is None:
            return BuildOutcome(config, out, UP_TO_DATE, time.monotonic() - started, _folder_bytes(out))
        replacing = out.is_dir() and any(out.iterdir())
        result = execute_merge(prepare_merge(config, out, _with_force(options, replacing)))
        return BuildOutcome(config, out, BUILT, time.monotonic() - started, result.output_bytes, stale)
    except FrankenMoEError as error:
        return BuildOutcome(config, out, FAILED, time.monotonic() - started, 0, f"{error.kind}: {error.message}", error.exit_code)


def stale_reason(config: Path, out: Path, options: MergeOptions) -> str | None:
    """Why `out` must be (re)built from `config`; None when its manifest says it is up to date."""
    if not out.exists():
        return "no output yet"
    try:
        manifest = read_manifest(out)
    except FrankenMoEError:
        return "the output has no readable build record"
    parsed, text, _ = read_config_input(config)
    if manifest.get("frankenmoe_version") != __version__:
        return f"built by frankenmoe {manifest.get('frankenmoe_version')}, this is {__version__}"
    if manifest.get("config_sha256") != normalised_config_sha256(text):
        return "the config changed"
    recorded = manifest.get("options", {})
    if any(recorded.get(key) != value for key, value in options.requested().items()):
        return "an option that changes the output's bytes differs"
    full_hash = any("sha256" in file for source in manifest.get("sources", []) for file in source.get("files", []))
    base, experts, shared = load_sources(parsed)
    roles = [("base", base), *((f"experts[{i}]", expert) for i, expert in enumerate(experts))]
    if shared is not None:
        roles.append(("shared_experts[0]", shared))
    current = [source_record(role, source, full_hash) for role, source in roles]
    if current != manifest.get("sources"):
        return "a source model's files changed"
    return None


def _with_force(options: MergeOptions, force: bool) -> MergeOptions:
    return replace(options, force=options.force or force)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
