"""The `frankenmoe` command: parse options, call the library, render results, map errors to exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from frankenmoe import __version__
from frankenmoe.architectures import OUTPUT_LAYOUTS
from frankenmoe.config import DTYPES
from frankenmoe.errors import FrankenMoEError, MergeInterruptedError
from frankenmoe.merge import MergeOptions, PreparedMerge, execute_merge, prepare_merge
from frankenmoe.output import format_bytes
from frankenmoe.plan import SAFETENSORS_TO_CONFIG_DTYPE, parse_size

app = typer.Typer(
    help="Build Mixtral-format Mixture-of-Experts checkpoints from dense fine-tunes of one base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"frankenmoe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """frankenmoe: assemble a Mixture-of-Experts from fine-tunes of one base model, without training."""


def run_reporting_errors(action: Callable[[], T], verbose: bool) -> T:
    """Run `action`; turn the tool's errors and Ctrl-C into a message and an exit code."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("frankenmoe").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        return action()
    except KeyboardInterrupt:
        error: FrankenMoEError = MergeInterruptedError(
            "Interrupted by Ctrl-C. Partial output was removed; nothing was changed."
        )
        if verbose:
            raise
    except FrankenMoEError as caught:
        error = caught
        if verbose:
            raise
    typer.secho(f"{error.kind}: {error.message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(error.exit_code)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="The merge config (mergekit-moe YAML schema).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output folder for the Mixtral checkpoint.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty OUT (only once the new checkpoint is complete).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for random gates and expert noise.")] = 0,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")] = "5GB",
    dtype: Annotated[
        str | None, typer.Option(help=f"Output dtype ({', '.join(DTYPES)}); overrides the config.", show_default=False)
    ] = None,
    device: Annotated[str, typer.Option(help="Where the hidden-state pass runs: cpu or cuda.")] = "cpu",
    layout: Annotated[
        str, typer.Option(help="Output tensor layout: classic (every Mixtral loader) or fused (transformers 5 only).")
    ] = "classic",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging; tracebacks on errors.")] = False,
) -> None:
    """Merge the models named in CONFIG into a Mixtral-format checkpoint in OUT."""

    def action() -> None:
        options = MergeOptions(
            layout=_choice(layout, tuple(OUTPUT_LAYOUTS), "--layout"),
            dtype=None if dtype is None else _choice(dtype, DTYPES, "--dtype"),
            shard_bytes=parse_size(shard_size),
            seed=seed,
            device=device,
            force=force,
            show_progress=sys.stderr.isatty() or verbose,
        )
        prepared = prepare_merge(config, out, options)
        _print_plan(prepared, detailed=dry_run)
        if dry_run:
            typer.echo("Dry run: nothing was written.")
            return
        execute_merge(prepared, out, options)
        typer.echo(f"Wrote {format_bytes(prepared.plan.output_bytes)} in {prepared.plan.shard_count} shard(s) to {out}")

    run_reporting_errors(action, verbose)


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    from frankenmoe.errors import ConfigError

    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not valid; choose one of: {', '.join(choices)}.")
    return value


def _print_plan(prepared: PreparedMerge, detailed: bool) -> None:
    plan = prepared.plan
    typer.echo(f"base model: {plan.base.reference} ({plan.base.path})")
    for index, expert in enumerate(plan.experts):
        typer.echo(f"expert {index}: {expert.reference} ({expert.path})")
    typer.echo(
        f"gate mode: {plan.config.gate_mode}; experts per token: {plan.config.experts_per_token}; "
        f"layout: {plan.layout.name}; dtype: {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]}"
    )
    typer.echo(f"parameters: {plan.total_parameters:,} total, {plan.active_parameters:,} active per token")
    typer.echo(
        f"tensors: {len(plan.jobs)} in {plan.shard_count} shard(s); output {format_bytes(plan.output_bytes)}; "
        f"free on disk {format_bytes(prepared.free_bytes)}"
    )
    if not detailed:
        return
    typer.echo("\nshard  dtype  shape                 tensor  <-  source")
    for job in plan.jobs:
        if job.router_layer is not None:
            origin = f"router ({plan.config.gate_mode})"
        else:
            origin = ", ".join(f"{piece.location.file.parent.name}/{piece.location.name}" for piece in job.pieces)
        shape = "x".join(map(str, job.shape))
        typer.echo(f"{job.shard + 1:>5}  {job.dtype:<5}  {shape:<20}  {job.name}  <-  {origin}")
