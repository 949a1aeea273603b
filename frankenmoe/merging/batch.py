"""`frankenmoe build`: several configs into one folder each, skipping outputs that are up to date.

An output is up to date when its manifest records the same normalised config, tool version,
byte-changing options and source fingerprints as the current ones, and the output still holds
exactly the files the manifest lists, each of the size it records. That integrity check costs one
stat per file; reading the output again to compare its sha256 costs as much as `verify` (every
output byte), which would make checking a batch cost a good part of building it, so it is done
with `--hash-sources` only, the option that already trades reading everything for certainty. With
it, sources are compared by their full sha256 too: a source rewritten in place with the same
header and size (one matrix of a large file) can escape the sampled fingerprint, never the full
hash. A manifest of the wrong shape, or one that cannot be read, makes its output "not up to date".

Configs run one after another: a merge is bound by the disk, so two at once would each take about
twice as long and hold twice the page cache. Split a batch across CI jobs instead (one config per
job). Ctrl-C or SIGTERM stops the batch: the config being written is abandoned (its staging folder
removed), later ones are not started, finished outputs stay, and `BuildInterrupted` carries the report.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from frankenmoe import __version__
from frankenmoe.analysis.verify import manifest_mismatch, verify_output
from frankenmoe.checkpoint.manifest import (
    MANIFEST_NAME,
    normalised_config_sha256,
    read_manifest,
    source_records,
)
from frankenmoe.checkpoint.output_recovery import recover_interrupted_output
from frankenmoe.checkpoint.output_rules import absolute_target
from frankenmoe.errors import ConfigError, FrankenMoEError
from frankenmoe.merging.prepare import MergeOptions, load_sources, prepare_merge, read_config_input
from frankenmoe.merging.run import execute_merge
from frankenmoe.runtime.interrupts import SigtermInterrupt, take_held_signals

logger = logging.getLogger("frankenmoe")

BUILT, UP_TO_DATE, FAILED, INTERRUPTED, SKIPPED = "built", "up to date", "failed", "interrupted", "skipped"
STATUSES = (BUILT, UP_TO_DATE, FAILED, INTERRUPTED, SKIPPED)
INTERRUPTED_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""128 + the signal's number, as shells report a process a signal stopped."""


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
        """130/143 when a signal stopped the batch, else the first failure's exit code, else 0."""
        stopped = [outcome for outcome in self.outcomes if outcome.status in (INTERRUPTED, SKIPPED)]
        first = (stopped or list(self.failed))[:1]
        return first[0].exit_code if first else 0

    def counts(self) -> dict[str, int]:
        return {status: sum(outcome.status == status for outcome in self.outcomes) for status in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcomes": [outcome.to_dict() for outcome in self.outcomes],
            "counts": self.counts(),
            "exit_code": self.exit_code,
        }


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a batch: still a KeyboardInterrupt for library callers, with the report so far.

    `report` lists every config: built or up to date before the signal, the one it interrupted (its
    staging folder removed, its output folder as it was) and the ones never started (skipped).
    """

    def __init__(self, report: BuildReport, signum: int) -> None:
        self.report = report
        self.signum = signum
        self.message = _interruption_summary(report, signum)
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT_CODES.get(signal.Signals(self.signum), 130)


def build_configs(
    configs: Sequence[Path], out_dir: Path, options: MergeOptions, *, rebuild: bool = False, fail_fast: bool = False
) -> BuildReport:
    """Merge each config into `out_dir/<config stem>`; a failure stops the rest only with `fail_fast`.

    Raises BuildInterrupted when Ctrl-C or SIGTERM arrives, once the config being written is cleaned up.
    """
    outs = [output_folder(config, out_dir) for config in configs]
    duplicates = sorted({out.name for out in outs if outs.count(out) > 1})
    if duplicates:
        raise ConfigError(
            f"Several configs share the name {duplicates[0]!r}, so they would build into the same folder "
            f"{out_dir / duplicates[0]}. Rename them so each config's file name is unique."
        )
    outcomes: list[BuildOutcome] = []
    for index, (config, out) in enumerate(zip(configs, outs, strict=True)):
        started = time.monotonic()
        try:
            outcome = _build_one(config, out, options, rebuild)
        except KeyboardInterrupt as caught:
            signum = signal.SIGTERM if isinstance(caught, SigtermInterrupt) else signal.SIGINT
            code = INTERRUPTED_EXIT_CODES[signum]
            reason = f"stopped by {_signal_name(signum)}; any partial output was removed"
            outcomes.append(BuildOutcome(config, out, INTERRUPTED, time.monotonic() - started, 0, reason, code))
            raise _stopped(outcomes, configs[index + 1 :], outs[index + 1 :], signum) from None
        logger.info("%s: %s%s", config, outcome.status, f" ({outcome.reason})" if outcome.reason else "")
        outcomes.append(outcome)
        if index + 1 < len(configs):
            # A signal held while this merge swapped in its output (or cleaned up after a failure) stops the
            # batch here; after the last config there is nothing left to stop, and the command reports it.
            held = take_held_signals()
            if held:
                raise _stopped(outcomes, configs[index + 1 :], outs[index + 1 :], held[0])
        if outcome.status == FAILED and fail_fast:
            break
    return BuildReport(tuple(outcomes))


def output_folder(config: Path, out_dir: Path) -> Path:
    """`out_dir/<config stem>`; a stem that would name `out_dir` itself or a folder outside it is a ConfigError."""
    stem = config.stem
    folder = out_dir / stem
    separators = {os.sep, *([os.altsep] if os.altsep else [])}
    inside = absolute_target(folder).parent == absolute_target(out_dir)
    if stem in ("", ".", "..") or any(separator in stem for separator in separators) or not inside:
        raise ConfigError(
            f"The config {config} would build into {folder}, which is not a folder of its own inside --out-dir "
            f"{out_dir}: build names each output after its config file without .yaml, and {stem!r} is not a usable "
            "folder name. Rename the config file (e.g. moe.yaml)."
        )
    return folder


def _stopped(
    outcomes: list[BuildOutcome], later: Sequence[Path], later_outs: Sequence[Path], signum: int
) -> BuildInterrupted:
    code = INTERRUPTED_EXIT_CODES.get(signal.Signals(signum), 130)
    reason = f"not started: the build was stopped by {_signal_name(signum)}"
    skipped = [
        BuildOutcome(config, out, SKIPPED, 0.0, 0, reason, code) for config, out in zip(later, later_outs, strict=True)
    ]
    return BuildInterrupted(BuildReport((*outcomes, *skipped)), signum)


def _signal_name(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def _interruption_summary(report: BuildReport, signum: int) -> str:
    by_status = {
        status: ", ".join(outcome.config.name for outcome in report.outcomes if outcome.status == status)
        for status in STATUSES
    }
    done = "; ".join(f"{status}: {names}" for status, names in by_status.items() if names)
    return (
        f"The build was stopped by {_signal_name(signum)} ({done}). The interrupted config's partial output was "
        "removed and the outputs already built are kept; run the same build again to finish the rest."
    )


def _build_one(config: Path, out: Path, options: MergeOptions, rebuild: bool) -> BuildOutcome:
    started = time.monotonic()
    try:
        # First what a killed run left (a staging folder, a half-done --force swap): the output it leaves is
        # the one the up-to-date check must judge.
        recover_interrupted_output(out, manifest_mismatch)
        stale = "--rebuild" if rebuild else stale_reason(config, out, options)
        if stale is None:
            return BuildOutcome(config, out, UP_TO_DATE, time.monotonic() - started, _folder_bytes(out))
        replacing = out.is_dir() and any(out.iterdir())
        result = execute_merge(prepare_merge(config, out, _with_force(options, replacing)))
        return BuildOutcome(config, out, BUILT, time.monotonic() - started, result.output_bytes, stale)
    except FrankenMoEError as error:
        return BuildOutcome(
            config, out, FAILED, time.monotonic() - started, 0, f"{error.kind}: {error.message}", error.exit_code
        )


def stale_reason(config: Path, out: Path, options: MergeOptions) -> str | None:
    """Why `out` must be (re)built from `config`; None when its manifest says it is up to date and it is intact."""
    if not out.exists():
        return "no output yet"
    try:
        manifest = read_manifest(out)
    except FrankenMoEError:
        return "the output has no readable build record"
    damaged = _record_problem(manifest)
    if damaged is not None:
        return f"the output's build record is damaged ({damaged})"
    changed = _output_problem(out, manifest["files"])
    if changed is not None:
        return f"the output is not what its build record lists ({changed})"
    parsed, text, _ = read_config_input(config)
    if manifest.get("frankenmoe_version") != __version__:
        return f"built by frankenmoe {manifest.get('frankenmoe_version')}, this is {__version__}"
    if manifest.get("config_sha256") != normalised_config_sha256(text):
        return "the config changed"
    recorded = manifest["options"]
    if any(recorded.get(key) != value for key, value in options.requested().items()):
        return "an option that changes the output's bytes differs"
    files = [file for source in manifest["sources"] for file in (*source["files"], *source.get("adapter_files", ()))]
    full_hash = any("sha256" in file for file in files)
    if options.hash_sources and not all("sha256" in file for file in files):
        return "--hash-sources compares sources by full sha256, and the build record has only sampled fingerprints"
    base, experts, shared = load_sources(parsed)
    current = source_records(base, experts, shared, full_hash)
    if current != manifest["sources"]:
        return "a source model's files changed"
    if options.hash_sources:
        return _verify_problem(out)
    return None


def _record_problem(manifest: dict[str, Any]) -> str | None:
    """What in the manifest does not have the shape this check reads; None when all of it does.

    manifest.read_manifest schema-checks the whole record; this guards the fields read here, so that a
    hand-edited record makes its output "not up to date" instead of stopping the batch with a traceback.
    """
    if not isinstance(manifest.get("options"), dict):
        return "options is not a mapping"
    sources = manifest.get("sources")
    if not isinstance(sources, list) or not all(isinstance(source, dict) for source in sources):
        return "sources is not a list of mappings"
    for source in sources:
        for key in ("files", "adapter_files"):
            files = source.get(key, [])
            if not isinstance(files, list) or not all(isinstance(file, dict) for file in files):
                return f"a source's {key} is not a list of mappings"
    for record in manifest["files"]:
        if not isinstance(record, dict) or not _is_plain_name(record.get("name")):
            return "an output file's name is not a file name"
        if not isinstance(record.get("size"), int) or isinstance(record.get("size"), bool):
            return f"{record['name']}'s size is not a whole number"
    return None


def _is_plain_name(name: object) -> bool:
    """One file directly in the output folder: the check must never stat anything outside it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _output_problem(out: Path, files: list[dict[str, Any]]) -> str | None:
    """The first file that is missing, of another size than recorded, or not listed: one stat per file."""
    listed = {record["name"]: record["size"] for record in files}
    for name, size in listed.items():
        path = out / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, the build record says {size}"
    added = sorted(entry.name for entry in out.iterdir() if entry.name not in listed and entry.name != MANIFEST_NAME)
    if added:
        return f"{added[0]} was added after the merge"
    return None


def _verify_problem(out: Path) -> str | None:
    """With --hash-sources: the output re-hashed against its manifest and checked against its config (`verify`)."""
    try:
        report = verify_output(out)
    except FrankenMoEError as error:
        return f"verify could not check the output ({error.message})"
    if report.ok:
        return None
    more = f" and {len(report.problems) - 1} more" if len(report.problems) > 1 else ""
    return f"the output differs from its build record: {report.problems[0]}{more}"


def _with_force(options: MergeOptions, force: bool) -> MergeOptions:
    return replace(options, force=options.force or force)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
