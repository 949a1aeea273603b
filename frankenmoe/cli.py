"""The `frankenmoe` command: parse options, call the library, render results, map errors to exit codes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click: its exceptions and contexts are not click's
    from typer import _click as click_api
except ImportError:  # older typer is built on click itself
    import click as click_api  # type: ignore[no-redef]

from frankenmoe import __version__
from frankenmoe.architectures import LAYOUT_NAMES
from frankenmoe.config import DTYPES
from frankenmoe.errors import ConfigError, FrankenMoEError, InternalError, MergeInterruptedError, OutputError
from frankenmoe.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.output import SigtermInterrupt, format_bytes, interrupt_scope

# torch, transformers and everything built on them load in the commands that use them, not here:
# `--version` and `--help` stay instant, and Ctrl-C while they load is reported like any other.
if TYPE_CHECKING:
    from rich.console import Console

    from frankenmoe.batch import BuildReport
    from frankenmoe.evaluation import EvaluationReport
    from frankenmoe.inspection import CheckpointReport
    from frankenmoe.pipeline import PreparedMerge
    from frankenmoe.routing import PromptRouting, RoutingAccuracy, RoutingSummary

QUIET_OPTIONS = ("--quiet", "-q")
LOG_FORMAT_OPTION = "--log-format"
VERBOSE_OPTIONS = ("--verbose", "-v")


class CommandGroup(TyperGroup):
    """The `frankenmoe` group: the common options work before and after the command name, and with
    `--log-format json` a usage error is one JSON `error` event (exit 2) like every other error."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        arguments = list(sys.argv[1:] if args is None else args)
        if not _asks_for_json(arguments):
            return super().main(arguments, prog_name, complete_var, standalone_mode, **extra)
        # Not standalone: click would print usage errors as text (typer's as a rich panel) and exit itself.
        # The main callback has not run yet when the group's own options are wrong.
        _output["log_format"] = "json"
        try:
            code = super().main(arguments, prog_name, complete_var, standalone_mode=False, **extra)
        except click_api.ClickException as error:
            command = f"`{error.ctx.command_path} --help`" if getattr(error, "ctx", None) else "`frankenmoe --help`"
            message = f"{error.format_message().rstrip('.')}. Run {command} for the usage."
            code = _report_error("usage error", message, error.exit_code)
        except typer.Abort:
            code = _report_error("interrupted", "Aborted.", 1)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def parse_args(self, ctx: click_api.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _common_options_in_place(self, ctx, args))


def _asks_for_json(arguments: Sequence[str]) -> bool:
    for index, argument in enumerate(arguments):
        if argument == "--":
            return False
        if argument == f"{LOG_FORMAT_OPTION}=json" or (
            argument == LOG_FORMAT_OPTION and arguments[index + 1 : index + 2] == ["json"]
        ):
            return True
    return False


def _common_options_in_place(group: TyperGroup, ctx: click_api.Context, arguments: list[str]) -> list[str]:
    """`arguments` with --quiet/--log-format given after the command moved in front of it (they are the
    group's options) and --verbose given before it moved behind it (it is each command's option)."""
    position = _command_position(arguments)
    command = None if position is None else group.get_command(ctx, arguments[position])
    if position is None or command is None:
        return arguments  # no command, or an unknown one: click reports it
    own = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    takes_value = {
        name
        for param in command.params
        if param.param_type_name == "option" and not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for name in param.opts
    }
    before, name, after = arguments[:position], arguments[position], arguments[position + 1 :]
    hoisted: list[str] = []
    kept: list[str] = []
    index = 0
    while index < len(after):
        argument = after[index]
        step = 2 if argument in takes_value or argument == LOG_FORMAT_OPTION else 1
        if argument == "--":
            kept += after[index:]
            break
        common = argument in QUIET_OPTIONS or argument.split("=")[0] == LOG_FORMAT_OPTION
        (kept if argument in own or not common else hoisted).extend(after[index : index + step])
        index += step
    moved = [argument for argument in before if argument in VERBOSE_OPTIONS and argument in own]
    before = [argument for argument in before if argument not in moved]
    return [*before, *hoisted, name, *moved, *kept]


def _command_position(arguments: Sequence[str]) -> int | None:
    index = 0
    while index < len(arguments):
        if arguments[index] == LOG_FORMAT_OPTION:
            index += 2
        elif arguments[index].startswith("-"):
            index += 1
        else:
            return index
    return None


app = typer.Typer(
    cls=CommandGroup,
    help="Build Mixture-of-Experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) from dense fine-tunes of one base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
T = TypeVar("T")


def console_main() -> None:
    """The `frankenmoe` command (and `python -m frankenmoe`): the CLI, then an immediate exit.

    Once a command has returned, everything it wrote is closed and fsynced, and its log handler
    (a stream handler on stderr, flushed with every record) is removed; what Python's own shutdown
    would still do is run torch's finalisers, about a second of nothing. stdout and stderr are
    flushed first, and the exit code is the one the command chose. An exception that escapes the
    CLI (a bug) takes the usual path, traceback and all. Code that calls `app` itself (the tests
    do) exits normally.
    """
    try:
        app(prog_name="frankenmoe")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach the reader
            stream.flush()
    os._exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"frankenmoe {__version__}")
        raise typer.Exit()


LOG_FORMATS = ("text", "json")
_output = {"quiet": False, "log_format": "text"}
"""Set by the global options; read by every command's reporting."""


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option(*QUIET_OPTIONS, help="Print only warnings and errors (and output asked for with --json).")
    ] = False,
    log_format: Annotated[
        str,
        typer.Option(
            LOG_FORMAT_OPTION,
            help="text, or json: every stderr line is one JSON object (stage started/finished, warning, note, "
            "difference, error).",
        ),
    ] = "text",
) -> None:
    """frankenmoe: assemble a Mixture-of-Experts from fine-tunes of one base model, without training.

    Progress bars are shown only when stderr is a terminal. --quiet and --log-format may also follow the
    command name, and a command's --verbose may precede it.
    """
    if log_format not in LOG_FORMATS:
        typer.secho(f"config error: --log-format {log_format!r} is not valid; choose text or json.", err=True, fg="red")
        raise typer.Exit(ConfigError.exit_code)
    _output.update(quiet=quiet, log_format=log_format)
    keep_large_buffers_out_of_the_heap()


def say(text: str) -> None:
    """Print a line of the human-readable report, unless --quiet."""
    if not _output["quiet"]:
        typer.echo(text)


def tell(event: str, message: str, prefix: str, color: str, **fields: object) -> None:
    """One line on stderr: `prefix: message` in `color`, or with --log-format json one JSON object
    {"event": event, "message": message, **fields}. Everything the CLI writes to stderr goes through here."""
    if _output["log_format"] == "json":
        typer.echo(json.dumps({"event": event, "message": message, **fields}), err=True)
    else:
        typer.secho(f"{prefix}: {message}", err=True, fg=color)


def _report_error(kind: str, message: str, exit_code: int, failure: BaseException | None = None) -> int:
    """Print an error (with `failure`'s traceback, when given: first as text, or in a JSON field) and return its exit code."""
    if _output["log_format"] == "json" or failure is None:
        details = {} if failure is None else {"traceback": "".join(traceback.format_exception(failure))}
        tell("error", message, kind, typer.colors.RED, kind=kind, exit_code=exit_code, **details)
    else:
        traceback.print_exception(failure, file=sys.stderr)
        tell("error", message, kind, typer.colors.RED)
    return exit_code


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: event (stage, warning, info, error), message and the record's fields."""

    FIELDS = ("stage", "status", "seconds")

    def format(self, record: logging.LogRecord) -> str:
        event = "stage" if hasattr(record, "stage") else record.levelname.lower()
        data: dict[str, object] = {"event": event, "message": record.getMessage()}
        data.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        return json.dumps(data)


def _log_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    if _output["log_format"] == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return handler


def _log_level(verbose: bool) -> int:
    if verbose or _output["log_format"] == "json":
        return logging.INFO
    return logging.WARNING


class TerminatedError(MergeInterruptedError):
    """SIGTERM (`timeout`, `docker stop`, a CI cancel): cleaned up like Ctrl-C; 143 is 128 + 15, as shells report it."""

    exit_code = 143


def run_reporting_errors(action: Callable[[], T], verbose: bool) -> T:
    """Run `action`; turn the tool's errors, I/O failures, Ctrl-C and SIGTERM into one message and an exit code.

    Without --verbose the user sees only the message; with it, the traceback comes first (with
    --log-format json, in the error event's `traceback` field). A signal that arrives once a merge has
    put its checkpoint in place stops nothing: the command succeeds. With --log-format json, an
    unexpected exception (a bug) is an `error` event with exit code 1 too, and Python warnings are
    logged as `warning` events, so that every stderr line stays one JSON object.
    """
    json_logs = _output["log_format"] == "json"
    handler = _log_handler()
    loggers = [logging.getLogger("frankenmoe"), *([logging.getLogger("py.warnings")] if json_logs else [])]
    for logger in loggers:
        logger.addHandler(handler)
    loggers[0].setLevel(_log_level(verbose))
    logging.captureWarnings(json_logs)
    try:
        with interrupt_scope() as signals_after_commit:
            value = action()
            _note_late_signals(signals_after_commit())
        return value
    except KeyboardInterrupt as caught:
        failure: BaseException = caught
        error: FrankenMoEError = _interruption(caught)
    except FrankenMoEError as caught:
        failure = error = caught
    except OSError as caught:
        failure = caught
        # Our own I/O paths raise OutputError/ModelError; a bare OSError is one they did not anticipate.
        error = OutputError(
            f"An unexpected file-system error stopped the run: {caught}. Check the paths, permissions and "
            "free disk space, then run again (with --verbose for the full traceback)."
        )
    except Exception as caught:
        if not json_logs:
            raise  # a bug: Python's traceback, exit 1
        failure = caught
        error = InternalError(
            f"An unexpected {type(caught).__name__} stopped the run: {caught}. This is a bug in frankenmoe; please "
            "report it with this event's traceback (run again with --verbose to include it)."
        )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        logging.captureWarnings(False)
    raise typer.Exit(_report_error(error.kind, error.message, error.exit_code, failure if verbose else None))


def _interruption(caught: KeyboardInterrupt) -> MergeInterruptedError:
    outcome = "Any partial output was removed; the output folder is as it was before."
    if isinstance(caught, SigtermInterrupt):
        return TerminatedError(f"Stopped by SIGTERM. {outcome}")
    return MergeInterruptedError(f"Interrupted by Ctrl-C. {outcome}")


def _note_late_signals(signals: Sequence[int]) -> None:
    if signals:
        names = " and ".join(sorted({"SIGTERM" if signum == signal.SIGTERM else "Ctrl-C" for signum in signals}))
        message = f"{names} arrived after the new checkpoint was in place; the merge had already completed."
        tell("note", message, "note", typer.colors.YELLOW)


WEIGHT_CACHE_HELP = (
    "Memory the hidden-state pass may use to keep the base model's matrices in float32 between passes, "
    "e.g. 6GB: fit's text generation then converts each matrix once instead of once per generated token. "
    "Default 0: stream them (bounded memory). The output is the same either way."
)


GGUF_TYPE_HELP = (
    "With --format gguf: bf16, f16, f32, q8_0 (the default), q4_0, q4_1, q5_0 or q5_1. For K-quants (Q4_K_M), "
    "write bf16 or f16 and run llama.cpp's llama-quantize on the file (docs/gguf.md)."
)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="The merge config (mergekit-moe YAML schema).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output folder for the Mixtral checkpoint.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the checkpoint a previous merge wrote to OUT (once the new one is complete)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for random gates and expert noise.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
    dtype: Annotated[
        str | None, typer.Option(help=f"Output dtype ({', '.join(DTYPES)}); overrides the config.", show_default=False)
    ] = None,
    device: Annotated[str, typer.Option(help="Where the hidden-state pass runs: cpu or cuda.")] = "cpu",
    layout: Annotated[
        str | None,
        typer.Option(
            help="Output tensor layout: classic (every loader; the default) or fused (Mixtral for transformers 5 only).",
            show_default=False,
        ),
    ] = None,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip routing the experts' positive prompts through the result.")
    ] = False,
    hash_sources: Annotated[
        bool,
        typer.Option(
            "--hash-sources", help="Record every source weight file's full sha256 in the manifest (reads them again)."
        ),
    ] = False,
    weight_cache: Annotated[str, typer.Option("--weight-cache", help=WEIGHT_CACHE_HELP)] = "0",
    format_: Annotated[
        str, typer.Option("--format", help="Output format: safetensors (a checkpoint folder) or gguf (one GGUF file).")
    ] = "safetensors",
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", help=GGUF_TYPE_HELP, show_default=False)] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
    stream_sources: Annotated[bool, typer.Option("--stream-sources", help=STREAM_SOURCES_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Merge the models named in CONFIG into a MoE checkpoint in OUT (with its build record, frankenmoe-manifest.json)."""

    def action() -> None:
        from frankenmoe.api import plan_merge, run_merge
        from frankenmoe.routing import routing_check_lines, routing_check_skip_reason

        prepared = plan_merge(
            config,
            out,
            layout=None if layout is None else _choice(layout, LAYOUT_NAMES, "--layout"),
            dtype=None if dtype is None else _choice(dtype, DTYPES, "--dtype"),
            shard_size=shard_size,
            seed=seed,
            device=device,
            force=force,
            check_routing=not no_check,
            hash_sources=hash_sources,
            weight_cache=weight_cache,
            progress=_show_progress(verbose),
            output_format=format_,
            gguf_type=gguf_type,
            stream_sources=stream_sources,
        )
        _print_plan(prepared, detailed=dry_run)
        if dry_run:
            say("Dry run: nothing was written.")
            return
        result = run_merge(prepared)
        if prepared.gguf is not None:
            say(f"Wrote {format_bytes(result.output_bytes)} to {out / prepared.gguf.file_name}")
            say(f"Run it: llama-cli -m {out / prepared.gguf.file_name} (or Ollama: see {out / 'README.md'})")
            return
        say(f"Wrote {format_bytes(result.output_bytes)} in {prepared.plan.shard_count} shard(s) to {out}")
        if result.routing_check is not None:
            say("\n".join(routing_check_lines(result.routing_check)))
        elif prepared.options.check_routing:
            say(routing_check_skip_reason(out, prepared.plan.config.experts))

    run_reporting_errors(lambda: _offline_if(offline, action), verbose)


OFFLINE_HELP = (
    "Never contact the Hugging Face Hub: repo ids are read from the local cache only (as HF_HUB_OFFLINE=1 does). "
    "Without it, a repo id not in the cache is checked remotely, then only the files the merge reads are downloaded."
)


STREAM_SOURCES_HELP = (
    "Read Hub sources' tensors over HTTP range requests straight into the output instead of downloading them: "
    "disk for the output only (the base is still downloaded when the routers run prompts through it)."
)


def _offline_if(enabled: bool, action: Callable[[], T]) -> T:
    from frankenmoe.hub import offline

    with offline(enabled):
        return action()


def _show_progress(verbose: bool) -> bool:
    """Progress bars only on a terminal (or with --verbose), never with --quiet or JSON logs."""
    if _output["quiet"] or _output["log_format"] == "json":
        return False
    return sys.stderr.isatty() or verbose


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="A folder a frankenmoe merge wrote.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Re-hash CHECKPOINT's files against its manifest and check its tensors against config.json.

    Exit 0 only if everything matches; 5 when something differs (each difference is printed).
    """

    def action() -> int:
        from frankenmoe.api import verify as verify_folder

        report = verify_folder(checkpoint)
        if as_json:
            typer.echo(json.dumps(report.to_dict(), indent=2))
        else:
            for problem in report.problems:
                tell("difference", problem, "differs", typer.colors.RED)
            for note in report.notes:
                say(f"note: {note}")
            verdict = "intact" if report.ok else f"{len(report.problems)} difference(s)"
            say(f"{checkpoint}: {verdict} ({report.files_checked} files, {report.tensors_checked} tensors checked)")
        return 0 if report.ok else VERIFY_FAILED_EXIT_CODE

    code = run_reporting_errors(action, verbose)
    if code:
        raise typer.Exit(code)


VERIFY_FAILED_EXIT_CODE = 5
"""`verify` found a difference: the checkpoint is not what its manifest records (or not consistent)."""


@app.command()
def build(
    configs: Annotated[list[Path], typer.Argument(help="Merge configs, one output each.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Each config goes into OUT_DIR/<config file stem>/.")],
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Merge every config, even those up to date.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first config that fails.")] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON to this file.", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for random gates and expert noise.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where the hidden-state pass runs: cpu or cuda.")] = "cpu",
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the routing check after each merge.")] = False,
    hash_sources: Annotated[
        bool, typer.Option("--hash-sources", help=BUILD_HASH_SOURCES_HELP, show_default=False)
    ] = False,
    weight_cache: Annotated[str, typer.Option("--weight-cache", help=WEIGHT_CACHE_HELP)] = "0",
    format_: Annotated[
        str, typer.Option("--format", help="Output format: safetensors (a checkpoint folder) or gguf (one GGUF file).")
    ] = "safetensors",
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", help=GGUF_TYPE_HELP, show_default=False)] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
    stream_sources: Annotated[bool, typer.Option("--stream-sources", help=STREAM_SOURCES_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Build several configs one after another, skipping those whose output is up to date.

    An output is up to date when its manifest records the same config, tool version, options and
    source fingerprints, and the output holds exactly the files it lists, at the sizes it lists (one
    stat per file; a byte changed in place is seen only with --hash-sources, or by verify). A failing
    config does not stop the others (unless --fail-fast); the exit code is non-zero if any failed.
    Ctrl-C or SIGTERM stops the batch (exit 130 or 143): the config being written is abandoned, later
    ones are not started, finished outputs stay. To spread a batch over CI machines, run one config per job.
    """

    def action() -> int:
        from frankenmoe.api import build as build_all
        from frankenmoe.batch import BuildInterrupted

        try:
            report = build_all(
                configs,
                out_dir,
                rebuild=rebuild,
                fail_fast=fail_fast,
                seed=seed,
                shard_size=shard_size,
                device=device,
                check_routing=not no_check,
                hash_sources=hash_sources,
                weight_cache=weight_cache,
                progress=_show_progress(verbose),
                output_format=format_,
                gguf_type=gguf_type,
                stream_sources=stream_sources,
            )
        except BuildInterrupted as stopped:
            _report_build(stopped.report, json_file)
            stop = TerminatedError if stopped.signum == signal.SIGTERM else MergeInterruptedError
            raise stop(stopped.message) from None
        _report_build(report, json_file)
        return report.exit_code

    code = run_reporting_errors(lambda: _offline_if(offline, action), verbose)
    if code:
        raise typer.Exit(code)


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="A safetensors checkpoint a frankenmoe merge wrote.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="The format to write: gguf.")] = "gguf",
    gguf_type: Annotated[str, typer.Option("--type", help=GGUF_TYPE_HELP.removeprefix("With --format gguf: "))] = "q8_0",
    output: Annotated[
        Path | None,
        typer.Option("--output", help="The GGUF file to write (default: CHECKPOINT-<TYPE>.gguf beside it).", show_default=False),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Write CHECKPOINT as one GGUF file: the same file `merge --format gguf` writes for its merge."""

    def action() -> None:
        from frankenmoe.api import convert_to_gguf

        if to != "gguf":
            raise ConfigError(f"--to {to!r} is not valid; frankenmoe converts to gguf.")
        record = convert_to_gguf(checkpoint, gguf_type, output)
        target = output or checkpoint.parent / record.name
        say(f"Wrote {format_bytes(record.size)} to {target} (sha256 {record.sha256})")

    run_reporting_errors(action, verbose)


BUILD_HASH_SOURCES_HELP = (
    "Compare sources by their full sha256 and re-hash every output file against its manifest (reads all of "
    "them once more). Without it, sources are compared by size and a sampled fingerprint (header and 16 "
    "blocks of 64 KiB), which misses a file rewritten in place with the same header and size, and outputs "
    "by file sizes only. An output whose record has only sampled fingerprints is rebuilt once to record full ones."
)


def _report_build(report: BuildReport, json_file: Path | None) -> None:
    """The summary table of a build (built, up to date, failed, interrupted, skipped) and its JSON file."""
    say(f"{'config':<32} {'status':<11} {'time (s)':>9} {'size':>10}  note")
    for outcome in report.outcomes:
        size = format_bytes(outcome.output_bytes) if outcome.output_bytes else "-"
        say(f"{outcome.config.name:<32} {outcome.status:<11} {outcome.seconds:>9.1f} {size:>10}  {outcome.reason}")
    counts = report.counts()
    stopped = counts["interrupted"] or counts["skipped"]
    stops = f", interrupted {counts['interrupted']}, skipped {counts['skipped']}" if stopped else ""
    say(f"built {counts['built']}, up to date {counts['up to date']}, failed {counts['failed']}{stops}")
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not valid; choose one of: {', '.join(choices)}.")
    return value


def _print_plan(prepared: PreparedMerge, detailed: bool) -> None:
    from frankenmoe.card import router_summary
    from frankenmoe.laser import describe_group
    from frankenmoe.plan import SAFETENSORS_TO_CONFIG_DTYPE
    from frankenmoe.sources import weight_formats_summary

    plan = prepared.plan
    say(f"base model: {plan.base.reference} ({plan.base.path})")
    for index, expert in enumerate(plan.experts):
        say(f"expert {index}: {expert.reference} ({expert.path}){expert.adapter_note}")
    if plan.shared_expert is not None:
        say(f"shared expert: {plan.shared_expert.reference} ({plan.shared_expert.path}){plan.shared_expert.adapter_note}")
    say(
        f"architecture: {plan.architecture.model_type} ({plan.architecture_reason}); "
        f"tensor layout: {plan.layout.name}"
    )
    if plan.architecture.shared_expert is not None:
        say(f"shared-expert gate: {plan.computed_origin('shared_expert_gate')}")
    if plan.skipped_tensors:
        say(
            f"skipped: {len(plan.skipped_tensors)} tensor(s) of the base model that every loader derives "
            f"(rotary inv_freq buffers, a tied lm_head): {', '.join(plan.skipped_tensors[:3])}"
            + (" ..." if len(plan.skipped_tensors) > 3 else "")
        )
    say(f"source weights: {weight_formats_summary((plan.base, *plan.experts))}")
    say(
        f"gate mode: {plan.config.gate_mode_description}; experts per token: {plan.config.experts_per_token}; "
        f"dtype: {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]}"
    )
    say(f"router prompts: {router_summary(plan.config)}")
    say(f"shared weights: {plan.shared_weights_origin()}")
    say(f"parameters: {plan.total_parameters:,} total, {plan.active_parameters:,} active per token")
    say(
        f"tensors: {len(plan.jobs)} in {plan.shard_count} shard(s); output {format_bytes(plan.output_bytes)}; "
        f"free on disk {format_bytes(prepared.free_bytes)}"
    )
    if prepared.downloads or any(source.hub is not None for source in (plan.base, *plan.experts)):
        from frankenmoe.hub import describe_downloads, describe_streams

        say("\n".join(describe_downloads(prepared.downloads)))
        if prepared.options.stream_sources:
            say("\n".join(describe_streams(prepared.streams)))
    for group in plan.laser_groups:
        say(describe_group(group, detailed))
    if prepared.gguf is not None:
        from frankenmoe.gguf_output import describe_gguf_tensor

        gguf = prepared.gguf
        say(
            f"GGUF: {gguf.file_name} ({gguf.architecture.name}), {len(gguf.tensors)} tensors, "
            f"{format_bytes(gguf.data_bytes)}; tokenizer {gguf.vocabulary.model} (pre-tokenizer {gguf.vocabulary.pre}); "
            f"{len(gguf.fallbacks)} tensor(s) fall back to F16"
        )
        if detailed:
            say("\nGGUF tensor                              shape                  type")
            say("\n".join(describe_gguf_tensor(tensor) for tensor in gguf.tensors))
    if not detailed:
        return
    say("\nshard  dtype  shape                 tensor  <-  source")
    for job in plan.jobs:
        if job.computed is not None:
            origin = f"computed {job.computed.kind.replace('_', ' ')}: {plan.computed_origin(job.computed.kind)}"
        elif job.merged is not None:
            origin = f"merged from the base and {len(job.merged.sources)} expert(s): {job.merged.describe()}"
        elif job.origin == "zeros":
            origin = "zeros (no source has this tensor)"
        else:
            origin = ", ".join(f"{piece.location.file.parent.name}/{piece.location.name}" for piece in job.pieces)
        shape = "x".join(map(str, job.shape))
        say(f"{job.shard + 1:>5}  {job.dtype:<5}  {shape:<20}  {job.name}  <-  {origin}")


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="A Mixtral-format checkpoint folder.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Summarise CHECKPOINT and diagnose its routers (reads headers and router tensors only)."""

    def action() -> None:
        from frankenmoe.inspection import inspect_checkpoint, report_to_dict

        report = inspect_checkpoint(checkpoint)
        if as_json:
            typer.echo(json.dumps(report_to_dict(report), indent=2))
        else:
            _print_inspection(report)

    run_reporting_errors(action, verbose)


def _print_inspection(report: CheckpointReport) -> None:
    from frankenmoe.inspection import DEGENERATE_CONDITION, NEAR_DUPLICATE_COSINE

    typer.echo(f"checkpoint: {report.path}")
    typer.echo(f"architecture: {report.architecture} ({report.layout} tensor layout)")
    typer.echo(
        f"layers: {report.num_layers}; experts: {report.num_experts}, {report.experts_per_token} per token; "
        f"hidden size {report.hidden_size}; intermediate size {report.intermediate_size}; vocabulary {report.vocab_size}"
    )
    typer.echo(f"parameters: {report.total_parameters:,} total, {report.active_parameters:,} active per token")
    stored = ", ".join(f"{dtype} {count:,}" for dtype, count in report.stored_dtypes.items())
    typer.echo(f"dtype: {report.dtype} (parameters stored as {stored})")
    shard_total = sum(shard.bytes for shard in report.shards)
    typer.echo(f"shards: {len(report.shards)} file(s), {format_bytes(shard_total)}")
    for shard in report.shards:
        typer.echo(f"  {shard.name}  {format_bytes(shard.bytes)}")
    tokenizer = ", ".join(report.tokenizer_files) if report.tokenizer_present else "none (`frankenmoe route` needs one)"
    typer.echo(f"tokenizer: {tokenizer}")
    if report.recipe is None:
        typer.echo("merge recipe: none (no frankenmoe model card in README.md)")
    else:
        typer.echo("merge recipe (from README.md):")
        for line in report.recipe.text.splitlines():
            typer.echo(f"  {line}")
    typer.echo(
        f"\nrouters (flagged: cosine > {NEAR_DUPLICATE_COSINE} between two rows; rank and condition number are "
        "those of the centred rows, since only differences between rows change a softmax router: flagged when "
        f"the rank is below experts - 1 or the condition number > {DEGENERATE_CONDITION:g}):"
    )
    typer.echo("layer  row norms (per expert)          max cosine (pair)   rank  condition")
    for router in report.routers:
        norms = " ".join(f"{norm:.3g}" for norm in router.row_norms)
        pairs = [
            (router.cosine[i][j], i, j) for i in range(report.num_experts) for j in range(i + 1, report.num_experts)
        ]
        closest = max(pairs, default=None)
        cosine = f"{closest[0]:.4f} ({closest[1]},{closest[2]})" if closest else "-"
        condition = "inf" if router.condition_number == float("inf") else f"{router.condition_number:.3g}"
        rank = f"{router.rank}/{router.full_rank}"
        typer.echo(f"{router.layer:>5}  {norms:<30}  {cosine:<18}  {rank:>4}  {condition}")
        for warning in router.warnings:
            typer.secho(f"       ! {warning}", fg=typer.colors.YELLOW)
    flagged = report.flagged_layers
    if flagged:
        typer.secho(
            f"{len(flagged)} of {report.num_layers} layer(s) flagged: {', '.join(map(str, flagged))}",
            fg=typer.colors.YELLOW,
        )
    else:
        typer.echo("no router problems found")


@app.command()
def route(
    checkpoint: Annotated[Path, typer.Argument(help="A Mixtral-format checkpoint folder.", show_default=False)],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt to route (repeatable).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="A text file with one prompt per line.", show_default=False)
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="YAML: expert index or name -> prompts that should reach it; prints accuracy.", show_default=False
        ),
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option(help="Also draw a heatmap PNG here (needs the `plot` extra: matplotlib).", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")] = False,
    device: Annotated[str, typer.Option(help="Where the model runs: cpu or cuda.")] = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Run prompts through CHECKPOINT and show which expert each token goes to, layer by layer."""

    def action() -> None:
        from rich.console import Console

        from frankenmoe.inspection import read_recipe
        from frankenmoe.pipeline import resolve_device
        from frankenmoe.plot import require_matplotlib, write_routing_heatmap
        from frankenmoe.routing import (
            accuracy_to_dict,
            expert_names,
            load_checkpoint,
            load_labels,
            read_prompts_file,
            route_prompts,
            routing_accuracy,
            routing_to_dict,
            summarise_routing,
        )

        if png is not None:
            require_matplotlib()
        loaded = load_checkpoint(checkpoint)
        recipe = read_recipe(checkpoint)
        sources = recipe.expert_sources if recipe else ()
        names = expert_names(loaded.num_experts, sources)
        texts = list(prompt or [])
        if prompts_file is not None:
            texts += read_prompts_file(prompts_file)
        labelled = [] if labels is None else load_labels(labels, loaded.num_experts, sources)
        for item in labelled:
            if item.text not in texts:
                texts.append(item.text)
        if not texts:
            raise ConfigError(
                "No prompts to route. Pass --prompt TEXT (repeatable), --prompts-file FILE or --labels FILE."
            )
        routings = route_prompts(loaded, texts, resolve_device(device))
        summary = summarise_routing(routings)
        by_text = {routing.prompt.text: routing for routing in routings}
        labelled_routings = [by_text[item.text] for item in labelled]
        label_values = [item.expert for item in labelled]
        accuracy = routing_accuracy(labelled_routings, label_values) if labelled else None
        if png is not None:
            write_routing_heatmap(png, routings, summary, names)
        if as_json:
            data = {"checkpoint": str(checkpoint), **routing_to_dict(routings, summary, names)}
            data["accuracy"] = accuracy and accuracy_to_dict(accuracy, labelled_routings, label_values, names)
            data["png"] = None if png is None else str(png)
            typer.echo(json.dumps(data, indent=2))
            return
        console = Console(highlight=False, soft_wrap=True)
        _print_routing(console, routings, summary, names)
        if accuracy is not None:
            _print_accuracy(console, accuracy, labelled_routings, label_values, names)
        if png is not None:
            console.print(f"heatmap written to {png}")

    run_reporting_errors(action, verbose)


EXPERT_STYLES = (
    "red",
    "green",
    "blue",
    "magenta",
    "cyan",
    "yellow",
    "bright_red",
    "bright_green",
    "bright_blue",
    "bright_magenta",
)
GRID_CELL = 4
TOKEN_LABEL = 16


def _expert_style(expert: int) -> str:
    return EXPERT_STYLES[expert % len(EXPERT_STYLES)]


def _print_routing(
    console: Console, routings: Sequence[PromptRouting], summary: RoutingSummary, names: Sequence[str]
) -> None:
    from rich.text import Text

    from frankenmoe.routing import content_probabilities, content_texts, summarise_routing

    layers, experts = summary.utilisation.shape
    legend = Text("experts: ")
    for expert, name in enumerate(names):
        legend.append(f"{expert} = {name}", style=_expert_style(expert))
        legend.append("  ")
    console.print(legend)
    header = " " * TOKEN_LABEL + "".join(f"{'L' + str(layer):>{GRID_CELL}}" for layer in range(layers))
    for number, routing in enumerate(routings, start=1):
        tokens = content_texts(routing)
        console.print(f"\nprompt {number}/{len(routings)}: {routing.prompt.text!r} ({len(tokens)} tokens)")
        console.print("top-1 expert per token and layer:")
        console.print(header)
        top = content_probabilities(routing).argmax(dim=-1)
        for position, token in enumerate(tokens):
            line = Text(f"{_token_label(token):<{TOKEN_LABEL}}")
            for layer in range(layers):
                expert = int(top[layer, position])
                line.append(f"{expert:>{GRID_CELL}}", style=_expert_style(expert))
            console.print(line)
        console.print("share of tokens per expert and layer (%):")
        shares = summarise_routing([routing]).utilisation
        for expert in range(experts):
            line = Text(f"{'expert ' + str(expert):<{TOKEN_LABEL}}")
            for layer in range(layers):
                share = float(shares[layer, expert])
                line.append(f"{share * 100:>{GRID_CELL}.0f}", style=_expert_style(expert) if share else "dim")
            console.print(line)
    console.print(
        f"\nexpert utilisation over all {len(routings)} prompt(s) (share of tokens whose top-1 expert it is):"
    )
    console.print(" " * 8 + "".join(f"{'e' + str(expert):>7}" for expert in range(experts)))
    rows = [(f"L{layer}", summary.utilisation[layer]) for layer in range(layers)]
    for label, row in [*rows, ("all", summary.overall_utilisation)]:
        line = Text(f"{label:<8}")
        for expert in range(experts):
            line.append(f"{float(row[expert]):>7.1%}", style=_expert_style(expert))
        console.print(line)
    console.print(
        f"mean routing entropy: {summary.mean_entropy:.3f} nats (0 = always one expert, "
        f"{math.log(experts):.3f} = uniform over all {experts})"
    )


def _print_accuracy(
    console: Console,
    accuracy: RoutingAccuracy,
    routings: Sequence[PromptRouting],
    labels: Sequence[int],
    names: Sequence[str],
) -> None:
    from frankenmoe.routing import preferred_expert

    hits = round(accuracy.prompt_accuracy * len(labels))
    console.print(f"\nrouting accuracy on {len(labels)} labelled prompt(s):")
    console.print(f"  prompts reaching their labelled expert: {hits}/{len(labels)} ({accuracy.prompt_accuracy:.0%})")
    by_layer = "  ".join(f"L{layer} {value:.0%}" for layer, value in enumerate(accuracy.token_accuracy_by_layer))
    console.print(f"  tokens whose top-1 expert is the label: {accuracy.token_accuracy:.0%} (by layer: {by_layer})")
    for expert, prompt_share in accuracy.prompt_accuracy_by_expert.items():
        console.print(
            f"  expert {expert} ({names[expert]}): prompts {prompt_share:.0%}, "
            f"tokens {accuracy.token_accuracy_by_expert[expert]:.0%}",
            style=_expert_style(expert),
        )
    for routing, label in zip(routings, labels, strict=True):
        chosen = preferred_expert(routing)
        if chosen != label:
            console.print(f"  miss: {routing.prompt.text!r} is labelled {label} but prefers expert {chosen}")


def _token_label(shown: str) -> str:
    """A token as `content_texts` shows it, cut to fit the grid's first column."""
    return shown if len(shown) < TOKEN_LABEL else shown[: TOKEN_LABEL - 2] + "…"


EVAL_BELOW_MIN_KEPT_EXIT_CODE = 6
"""`eval --min-kept X`: some domain keeps less than X of its best expert's gain over the base."""


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A MoE checkpoint folder (a merge).", show_default=False)],
    text: Annotated[
        list[str],
        typer.Option(
            "--text",
            "-t",
            help="NAME=PATH: a domain's held-out text (a text file, a folder of .txt files, or a .jsonl with a "
            "`text` field). Repeatable.",
            show_default=False,
        ),
    ],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="NAME=REF: a model to score, replacing the manifest's (base, expert0, expert1, ...) or adding one. "
            "Repeatable; needed when the checkpoint has no manifest (then base=REF is required).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON instead of text.")] = False,
    min_kept: Annotated[
        float | None,
        typer.Option(
            help=f"Exit {EVAL_BELOW_MIN_KEPT_EXIT_CODE} when a domain keeps less than this share of its best "
            "expert's gain over the base (e.g. 0.8).",
            show_default=False,
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    stride: Annotated[
        int | None, typer.Option(help="Tokens between window starts (default: the window).", show_default=False)
    ] = None,
    device: Annotated[str, typer.Option(help="Where the models run: cpu or cuda.")] = "cpu",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Held-out perplexity per domain of CHECKPOINT's MoE, its base and each expert (all streamed), and the
    share of the best expert's gain over the base that the MoE keeps."""

    def action() -> int:
        from frankenmoe.api import evaluate

        texts = {name: Path(value) for name, value in _named_values(text, "--text", "NAME=FILE").items()}
        models = _named_values(model or [], "--model", "NAME=REF")
        report = evaluate(
            checkpoint,
            texts,
            models=models,
            window=window,
            stride=stride,
            device=device,
            progress=_show_progress(verbose),
        )
        failing = [] if min_kept is None else report.below(min_kept)
        if as_json:
            data = report.to_dict()
            data["min_kept"] = min_kept
            data["below_min_kept"] = [row.domain for row in failing]
            typer.echo(json.dumps(data, indent=2))
        else:
            _print_evaluation(report)
        for row in failing:
            assert row.kept is not None and min_kept is not None
            typer.secho(
                f"below --min-kept {min_kept:g}: {row.domain} keeps {row.kept:.0%} of {row.best_expert}'s gain",
                err=True,
                fg=typer.colors.RED,
            )
        return EVAL_BELOW_MIN_KEPT_EXIT_CODE if failing else 0

    code = run_reporting_errors(action, verbose)
    if code:
        raise typer.Exit(code)


def _named_values(values: Sequence[str], option: str, form: str) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        name, separator, rest = value.partition("=")
        if not separator or not name.strip() or not rest.strip():
            raise ConfigError(f"{option} {value!r} is not {form}; write it as {option} {form}.")
        if name in named:
            raise ConfigError(f"{option} names {name!r} twice; give each one once.")
        named[name] = rest
    return named


def _print_evaluation(report: EvaluationReport) -> None:
    say(f"checkpoint: {report.checkpoint}; windows of {report.window} tokens, one every {report.stride}")
    say("experts: " + "  ".join(f"e{index} = {name}" for index, name in enumerate(report.expert_names)))
    for evaluated in report.models:
        say(f"  {'/'.join(evaluated.names)} ({evaluated.role}): {evaluated.reference}")
    say(
        f"\n{'domain':<12} {'tokens':>8} {'MoE ppl':>9} {'best expert':<16} {'its ppl':>9} {'base ppl':>9} "
        f"{'kept':>6}  top-1 share per expert"
    )
    for row in report.domains:
        kept = "n/a" if row.kept is None else f"{row.kept:.0%}"
        shares = " ".join(f"e{index} {share:.0%}" for index, share in enumerate(row.top1_share))
        say(
            f"{row.domain:<12} {row.tokens:>8} {row.moe_perplexity:>9.3f} {row.best_expert:<16} "
            f"{row.best_expert_perplexity:>9.3f} {row.base_perplexity:>9.3f} {kept:>6}  {shares}"
        )
    say(
        "kept = (base ppl - MoE ppl) / (base ppl - best expert's ppl): 100% keeps all of the best expert's gain, "
        "0% none, below 0 is worse than the base; n/a where no expert beats the base."
    )
