"""The `frankenmoe` typer app: global options, error handling and exit codes, logging (text or JSON).

The commands (frankenmoe.cli.commands) register on `app`; each runs its API call through
`run_reporting_errors`, which turns the tool's errors, I/O failures, Ctrl-C and SIGTERM into one
message and the documented exit code.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click: its exceptions and contexts are not click's
    from typer import _click as click_api
except ImportError:  # older typer is built on click itself
    import click as click_api  # type: ignore[no-redef]

from frankenmoe import SigtermInterrupt, __version__, interrupt_scope, keep_large_buffers_out_of_the_heap
from frankenmoe.errors import ConfigError, FrankenMoEError, InternalError, MergeInterruptedError, OutputError

# torch, transformers and everything built on them load with frankenmoe.api, inside the commands, not
# here: `--version` and `--help` stay instant, and Ctrl-C while they load is reported like any other.

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
        if param.param_type_name == "option"
        and not getattr(param, "is_flag", False)
        and not getattr(param, "count", False)
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


def show_progress(verbose: bool) -> bool:
    """Progress bars only on a terminal (or with --verbose), never with --quiet or JSON logs."""
    if _output["quiet"] or _output["log_format"] == "json":
        return False
    return sys.stderr.isatty() or verbose
