"""The commands: each parses its arguments, makes one call to frankenmoe.api and hands the result to render.

frankenmoe.api (and with it torch) is imported inside each command's action, under
`run_reporting_errors`: `--help` stays instant, and Ctrl-C while it loads is reported like any other.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from frankenmoe.cli import render
from frankenmoe.cli.app import TerminatedError, app, run_reporting_errors, say, show_progress
from frankenmoe.cli.options import (
    GGUF_TYPE_HELP,
    AsJson,
    BuildHashSources,
    Checkpoint,
    Dtype,
    GgufType,
    HashSources,
    Layout,
    MergeDevice,
    ModelDevice,
    NoCheck,
    Offline,
    OutputFormat,
    Seed,
    ShardSize,
    StreamSources,
    Verbose,
    WeightCache,
)
from frankenmoe.errors import ConfigError, MergeInterruptedError

VERIFY_FAILED_EXIT_CODE = 5
"""`verify` found a difference: the checkpoint is not what its manifest records (or not consistent)."""
EVAL_BELOW_MIN_KEPT_EXIT_CODE = 6
"""`eval --min-kept X`: some domain keeps less than X of its best expert's gain over the base."""


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="The merge config (mergekit-moe YAML schema).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output folder for the MoE checkpoint.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the checkpoint a previous merge wrote to OUT (once the new one is complete)."
        ),
    ] = False,
    seed: Seed = 0,
    shard_size: ShardSize = "5GB",
    dtype: Dtype = None,
    device: MergeDevice = "cpu",
    layout: Layout = None,
    no_check: NoCheck = False,
    hash_sources: HashSources = False,
    weight_cache: WeightCache = "0",
    format_: OutputFormat = "safetensors",
    gguf_type: GgufType = None,
    offline: Offline = False,
    stream_sources: StreamSources = False,
    verbose: Verbose = False,
) -> None:
    """Merge the models named in CONFIG into a MoE checkpoint in OUT (with its build record, frankenmoe-manifest.json)."""

    def action() -> None:
        from frankenmoe import api

        with api.offline(offline):
            prepared = api.plan_merge(
                config,
                out,
                layout=layout,
                dtype=dtype,
                shard_size=shard_size,
                seed=seed,
                device=device,
                force=force,
                check_routing=not no_check,
                hash_sources=hash_sources,
                weight_cache=weight_cache,
                progress=show_progress(verbose),
                output_format=format_,
                gguf_type=gguf_type,
                stream_sources=stream_sources,
            )
            render.lines(api.describe_plan(prepared, detailed=dry_run))
            if dry_run:
                say("Dry run: nothing was written.")
                return
            result = api.run_merge(prepared)
        render.lines(api.describe_result(prepared, result))

    run_reporting_errors(action, verbose)


# Over 60 lines only by its typer signature (one line per option) and help text: the body is one API call.
@app.command()
def build(
    configs: Annotated[list[Path], typer.Argument(help="Merge configs, one output each.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Each config goes into OUT_DIR/<config file stem>/.")],
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Merge every config, even those up to date.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first config that fails.")] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON to this file.", show_default=False)
    ] = None,
    seed: Seed = 0,
    shard_size: ShardSize = "5GB",
    dtype: Dtype = None,
    device: MergeDevice = "cpu",
    layout: Layout = None,
    no_check: NoCheck = False,
    hash_sources: BuildHashSources = False,
    weight_cache: WeightCache = "0",
    format_: OutputFormat = "safetensors",
    gguf_type: GgufType = None,
    offline: Offline = False,
    stream_sources: StreamSources = False,
    verbose: Verbose = False,
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
        from frankenmoe import api

        try:
            with api.offline(offline):
                report = api.build(
                    configs,
                    out_dir,
                    rebuild=rebuild,
                    fail_fast=fail_fast,
                    seed=seed,
                    shard_size=shard_size,
                    dtype=dtype,
                    layout=layout,
                    device=device,
                    check_routing=not no_check,
                    hash_sources=hash_sources,
                    weight_cache=weight_cache,
                    progress=show_progress(verbose),
                    output_format=format_,
                    gguf_type=gguf_type,
                    stream_sources=stream_sources,
                )
        except api.BuildInterrupted as stopped:
            render.build_summary(stopped.report, json_file)
            stop = TerminatedError if stopped.signum == signal.SIGTERM else MergeInterruptedError
            raise stop(stopped.message) from None
        render.build_summary(report, json_file)
        return report.exit_code

    _exit_with(run_reporting_errors(action, verbose))


@app.command()
def verify(
    checkpoint: Checkpoint,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Re-hash CHECKPOINT's files against its manifest and check its tensors against config.json.

    Exit 0 only if everything matches; 5 when something differs (each difference is printed).
    """

    def action() -> int:
        from frankenmoe import api

        report = api.verify(checkpoint)
        render.verification(checkpoint, report, as_json)
        return 0 if report.ok else VERIFY_FAILED_EXIT_CODE

    _exit_with(run_reporting_errors(action, verbose))


@app.command()
def convert(
    checkpoint: Annotated[
        Path, typer.Argument(help="A safetensors checkpoint a frankenmoe merge wrote.", show_default=False)
    ],
    to: Annotated[str, typer.Option("--to", help="The format to write: gguf.")] = "gguf",
    gguf_type: Annotated[
        str, typer.Option("--type", help=GGUF_TYPE_HELP.removeprefix("With --format gguf: "))
    ] = "q8_0",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", help="The GGUF file to write (default: CHECKPOINT-<TYPE>.gguf beside it).", show_default=False
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Write CHECKPOINT as one GGUF file: the same file `merge --format gguf` writes for its merge."""

    def action() -> None:
        from frankenmoe import api

        # The API converts to GGUF only; --to exists so that the command line can grow other formats.
        if to != "gguf":
            raise ConfigError(f"--to {to!r} is not valid; frankenmoe converts to gguf.")
        record = api.convert_to_gguf(checkpoint, gguf_type, output)
        render.conversion(record, output or checkpoint.parent / record.name)

    run_reporting_errors(action, verbose)


@app.command("inspect")
def inspect_command(checkpoint: Checkpoint, as_json: AsJson = False, verbose: Verbose = False) -> None:
    """Summarise CHECKPOINT and diagnose its routers (reads headers and router tensors only)."""

    def action() -> None:
        from frankenmoe import api

        report = api.inspect(checkpoint)
        render.inspection(report, as_json, api.NEAR_DUPLICATE_COSINE, api.DEGENERATE_CONDITION)

    run_reporting_errors(action, verbose)


@app.command()
def route(
    checkpoint: Checkpoint,
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
    as_json: AsJson = False,
    device: ModelDevice = "cpu",
    verbose: Verbose = False,
) -> None:
    """Run prompts through CHECKPOINT and show which expert each token goes to, layer by layer."""

    def action() -> None:
        from frankenmoe import api

        result = api.route(
            checkpoint, prompt or [], device=device, prompts_file=prompts_file, labels_file=labels, png=png
        )
        render.routing(result, as_json)

    run_reporting_errors(action, verbose)


@app.command("eval")
def eval_command(
    checkpoint: Checkpoint,
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
    device: ModelDevice = "cpu",
    verbose: Verbose = False,
) -> None:
    """Held-out perplexity per domain of CHECKPOINT's MoE, its base and each expert (all streamed), and the
    share of the best expert's gain over the base that the MoE keeps."""

    def action() -> int:
        from frankenmoe import api

        texts = {name: Path(value) for name, value in _named_values(text, "--text", "NAME=FILE").items()}
        report = api.evaluate(
            checkpoint,
            texts,
            models=_named_values(model or [], "--model", "NAME=REF"),
            window=window,
            stride=stride,
            device=device,
            progress=show_progress(verbose),
        )
        render.evaluation(report, as_json, min_kept)
        return EVAL_BELOW_MIN_KEPT_EXIT_CODE if min_kept is not None and report.below(min_kept) else 0

    _exit_with(run_reporting_errors(action, verbose))


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


def _exit_with(code: int) -> None:
    """End a command whose result decides its exit code (a failed build, a verify difference, eval below --min-kept)."""
    if code:
        raise typer.Exit(code)
