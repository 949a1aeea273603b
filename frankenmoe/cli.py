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
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from frankenmoe import __version__
from frankenmoe.architectures import LAYOUT_NAMES
from frankenmoe.config import DTYPES
from frankenmoe.errors import ConfigError, FrankenMoEError, MergeInterruptedError, OutputError
from frankenmoe.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.output import SigtermInterrupt, format_bytes, interrupt_scope

# torch, transformers and everything built on them load in the commands that use them, not here:
# `--version` and `--help` stay instant, and Ctrl-C while they load is reported like any other.
if TYPE_CHECKING:
    from rich.console import Console

    from frankenmoe.inspection import CheckpointReport
    from frankenmoe.pipeline import PreparedMerge
    from frankenmoe.routing import PromptRouting, RoutingAccuracy, RoutingSummary

app = typer.Typer(
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
        bool, typer.Option("--quiet", "-q", help="Print only warnings and errors (and output asked for with --json).")
    ] = False,
    log_format: Annotated[
        str,
        typer.Option(
            help="text, or json: one JSON object per line on stderr (stage started/finished, warning, error)."
        ),
    ] = "text",
) -> None:
    """frankenmoe: assemble a Mixture-of-Experts from fine-tunes of one base model, without training.

    Progress bars are shown only when stderr is a terminal.
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

    Without --verbose the user sees only the message; with it, the traceback comes first. A signal
    that arrives once a merge has put its checkpoint in place stops nothing: the command succeeds.
    """
    logger = logging.getLogger("frankenmoe")
    handler = _log_handler()
    logger.addHandler(handler)
    logger.setLevel(_log_level(verbose))
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
    finally:
        logger.removeHandler(handler)
    if verbose:
        traceback.print_exception(type(failure), failure, failure.__traceback__, file=sys.stderr)
    if _output["log_format"] == "json":
        typer.echo(json.dumps({"event": "error", "kind": error.kind, "message": error.message, "exit_code": error.exit_code}), err=True)
    else:
        typer.secho(f"{error.kind}: {error.message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(error.exit_code)


def _interruption(caught: KeyboardInterrupt) -> MergeInterruptedError:
    outcome = "Any partial output was removed; the output folder is as it was before."
    if isinstance(caught, SigtermInterrupt):
        return TerminatedError(f"Stopped by SIGTERM. {outcome}")
    return MergeInterruptedError(f"Interrupted by Ctrl-C. {outcome}")


def _note_late_signals(signals: Sequence[int]) -> None:
    if signals:
        names = " and ".join(sorted({"SIGTERM" if signum == signal.SIGTERM else "Ctrl-C" for signum in signals}))
        typer.secho(
            f"note: {names} arrived after the new checkpoint was in place; the merge had already completed.",
            err=True,
            fg=typer.colors.YELLOW,
        )


WEIGHT_CACHE_HELP = (
    "Memory the hidden-state pass may use to keep the base model's matrices in float32 between passes, "
    "e.g. 6GB: fit's text generation then converts each matrix once instead of once per generated token. "
    "Default 0: stream them (bounded memory). The output is the same either way."
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
        )
        _print_plan(prepared, detailed=dry_run)
        if dry_run:
            say("Dry run: nothing was written.")
            return
        result = run_merge(prepared)
        say(f"Wrote {format_bytes(result.output_bytes)} in {prepared.plan.shard_count} shard(s) to {out}")
        if result.routing_check is not None:
            say("\n".join(routing_check_lines(result.routing_check)))
        elif prepared.options.check_routing:
            say(routing_check_skip_reason(out, prepared.plan.config.experts))

    run_reporting_errors(action, verbose)


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
                typer.secho(f"differs: {problem}", err=True, fg=typer.colors.RED)
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
        bool, typer.Option("--hash-sources", help="Fingerprint sources by their full sha256 (reads them again).")
    ] = False,
    weight_cache: Annotated[str, typer.Option("--weight-cache", help=WEIGHT_CACHE_HELP)] = "0",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Build several configs one after another, skipping those whose output is up to date.

    An output is up to date when its manifest records the same config, tool version, options and
    source fingerprints. A failing config does not stop the others (unless --fail-fast); the exit code
    is non-zero if any failed. To spread a batch over CI machines, run one config per job.
    """

    def action() -> int:
        from frankenmoe.api import build as build_all

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
        )
        say(f"{'config':<32} {'status':<11} {'time (s)':>9} {'size':>10}  note")
        for outcome in report.outcomes:
            size = format_bytes(outcome.output_bytes) if outcome.output_bytes else "-"
            say(f"{outcome.config.name:<32} {outcome.status:<11} {outcome.seconds:>9.1f} {size:>10}  {outcome.reason}")
        counts = report.to_dict()["counts"]
        say(f"built {counts['built']}, up to date {counts['up to date']}, failed {counts['failed']}")
        if json_file is not None:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        return report.exit_code

    code = run_reporting_errors(action, verbose)
    if code:
        raise typer.Exit(code)


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
        f"gate mode: {plan.config.gate_mode}; experts per token: {plan.config.experts_per_token}; "
        f"dtype: {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]}"
    )
    say(f"router prompts: {router_summary(plan.config)}")
    say(f"shared weights: {plan.shared_weights_origin()}")
    say(f"parameters: {plan.total_parameters:,} total, {plan.active_parameters:,} active per token")
    say(
        f"tensors: {len(plan.jobs)} in {plan.shard_count} shard(s); output {format_bytes(plan.output_bytes)}; "
        f"free on disk {format_bytes(prepared.free_bytes)}"
    )
    for group in plan.laser_groups:
        say(describe_group(group, detailed))
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
        f"\nrouters (flagged: cosine > {NEAR_DUPLICATE_COSINE} between two rows; condition number > "
        f"{DEGENERATE_CONDITION:g} or rank below the expert count):"
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
        typer.echo(f"{router.layer:>5}  {norms:<30}  {cosine:<18}  {router.rank:>4}  {condition}")
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

    from frankenmoe.routing import content_probabilities, content_tokens, summarise_routing

    layers, experts = summary.utilisation.shape
    legend = Text("experts: ")
    for expert, name in enumerate(names):
        legend.append(f"{expert} = {name}", style=_expert_style(expert))
        legend.append("  ")
    console.print(legend)
    header = " " * TOKEN_LABEL + "".join(f"{'L' + str(layer):>{GRID_CELL}}" for layer in range(layers))
    for number, routing in enumerate(routings, start=1):
        tokens = content_tokens(routing)
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


def _token_label(token: str) -> str:
    # repr escapes newlines and tabs, which would otherwise break the grid.
    shown = repr(token)[1:-1]
    return shown if len(shown) < TOKEN_LABEL else shown[: TOKEN_LABEL - 2] + "…"
