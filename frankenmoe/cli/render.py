"""What the commands print: the API's return values as text, as JSON, or (with --quiet) only what was asked for.

Text meant as a report goes through `say` (silenced by --quiet); the output a command exists for
(inspect's report, route's grids, any --json) is printed whatever --quiet says; stderr lines go
through `tell` (text or one JSON object per line with --log-format json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from frankenmoe import format_bytes
from frankenmoe.cli.app import say, tell

if TYPE_CHECKING:
    from rich.console import Console

    from frankenmoe.api import BuildReport, CheckpointReport, EvaluationReport, FileRecord, RouteResult, VerifyReport


def lines(text: Iterable[str]) -> None:
    """A report's lines (a plan, a merge's outcome), unless --quiet."""
    for line in text:
        say(line)


def data(value: dict[str, Any]) -> None:
    """--json output: asked for, so printed even with --quiet."""
    typer.echo(json.dumps(value, indent=2))


def verification(checkpoint: Path, report: VerifyReport, as_json: bool) -> None:
    if as_json:
        data(report.to_dict())
        return
    for problem in report.problems:
        tell("difference", problem, "differs", typer.colors.RED)
    for note in report.notes:
        say(f"note: {note}")
    verdict = "intact" if report.ok else f"{len(report.problems)} difference(s)"
    say(f"{checkpoint}: {verdict} ({report.files_checked} files, {report.tensors_checked} tensors checked)")


def conversion(record: FileRecord, target: Path) -> None:
    say(f"Wrote {format_bytes(record.size)} to {target} (sha256 {record.sha256})")


def build_summary(report: BuildReport, json_file: Path | None) -> None:
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


def inspection(report: CheckpointReport, as_json: bool, near_duplicate: float, degenerate: float) -> None:
    """inspect's report; `near_duplicate` and `degenerate` are the cosine and condition number it flags above."""
    if as_json:
        data(report.to_dict())
        return
    echo = typer.echo
    echo(f"checkpoint: {report.path}")
    echo(f"architecture: {report.architecture} ({report.layout} tensor layout)")
    echo(
        f"layers: {report.num_layers}; experts: {report.num_experts}, {report.experts_per_token} per token; "
        f"hidden size {report.hidden_size}; intermediate size {report.intermediate_size}; vocabulary {report.vocab_size}"
    )
    echo(f"parameters: {report.total_parameters:,} total, {report.active_parameters:,} active per token")
    stored = ", ".join(f"{dtype} {count:,}" for dtype, count in report.stored_dtypes.items())
    echo(f"dtype: {report.dtype} (parameters stored as {stored})")
    echo(f"shards: {len(report.shards)} file(s), {format_bytes(sum(shard.bytes for shard in report.shards))}")
    for shard in report.shards:
        echo(f"  {shard.name}  {format_bytes(shard.bytes)}")
    tokenizer = ", ".join(report.tokenizer_files) if report.tokenizer_present else "none (`frankenmoe route` needs one)"
    echo(f"tokenizer: {tokenizer}")
    if report.recipe is None:
        echo("merge recipe: none (no frankenmoe model card in README.md)")
    else:
        echo("merge recipe (from README.md):")
        for line in report.recipe.text.splitlines():
            echo(f"  {line}")
    echo(
        f"\nrouters (flagged: cosine > {near_duplicate} between two rows; rank and condition number are "
        "those of the centred rows, since only differences between rows change a softmax router: flagged when "
        f"the rank is below experts - 1 or the condition number > {degenerate:g}):"
    )
    echo("layer  row norms (per expert)          max cosine (pair)   rank  condition")
    for router in report.routers:
        norms = " ".join(f"{norm:.3g}" for norm in router.row_norms)
        experts = range(report.num_experts)
        pairs = [(router.cosine[i][j], i, j) for i in experts for j in experts if j > i]
        closest = max(pairs, default=None)
        cosine = f"{closest[0]:.4f} ({closest[1]},{closest[2]})" if closest else "-"
        condition = "inf" if router.condition_number == float("inf") else f"{router.condition_number:.3g}"
        rank = f"{router.rank}/{router.full_rank}"
        echo(f"{router.layer:>5}  {norms:<30}  {cosine:<18}  {rank:>4}  {condition}")
        for warning in router.warnings:
            typer.secho(f"       ! {warning}", fg=typer.colors.YELLOW)
    flagged = report.flagged_layers
    if flagged:
        typer.secho(
            f"{len(flagged)} of {report.num_layers} layer(s) flagged: {', '.join(map(str, flagged))}",
            fg=typer.colors.YELLOW,
        )
    else:
        echo("no router problems found")


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


def routing(result: RouteResult, as_json: bool) -> None:
    """route's grids per prompt, utilisation and entropy, accuracy when labelled (from `result.to_dict()`)."""
    routed = result.to_dict()
    if as_json:
        data(routed)
        return
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    _routing_grids(console, routed, result.shown_tokens())
    if routed["accuracy"] is not None:
        _accuracy(console, routed["accuracy"], routed["expert_names"])
    if routed["png"] is not None:
        console.print(f"heatmap written to {routed['png']}")


def _expert_style(expert: int) -> str:
    return EXPERT_STYLES[expert % len(EXPERT_STYLES)]


def _routing_grids(console: Console, routed: dict[str, Any], shown_tokens: Sequence[Sequence[str]]) -> None:
    from rich.text import Text

    layers, experts, prompts = routed["layers"], routed["experts"], routed["prompts"]
    legend = Text("experts: ")
    for expert, name in enumerate(routed["expert_names"]):
        legend.append(f"{expert} = {name}", style=_expert_style(expert))
        legend.append("  ")
    console.print(legend)
    header = " " * TOKEN_LABEL + "".join(f"{'L' + str(layer):>{GRID_CELL}}" for layer in range(layers))
    for number, (prompt, tokens) in enumerate(zip(prompts, shown_tokens, strict=True), start=1):
        console.print(f"\nprompt {number}/{len(prompts)}: {prompt['text']!r} ({len(tokens)} tokens)")
        console.print("top-1 expert per token and layer:")
        console.print(header)
        top = prompt["top_expert"]
        for position, token in enumerate(tokens):
            line = Text(f"{_token_label(token):<{TOKEN_LABEL}}")
            for layer in range(layers):
                expert = top[layer][position]
                line.append(f"{expert:>{GRID_CELL}}", style=_expert_style(expert))
            console.print(line)
        console.print("share of tokens per expert and layer (%):")
        shares = prompt["expert_share"]
        for expert in range(experts):
            line = Text(f"{'expert ' + str(expert):<{TOKEN_LABEL}}")
            for layer in range(layers):
                share = shares[layer][expert]
                line.append(f"{share * 100:>{GRID_CELL}.0f}", style=_expert_style(expert) if share else "dim")
            console.print(line)
    console.print(f"\nexpert utilisation over all {len(prompts)} prompt(s) (share of tokens whose top-1 expert it is):")
    console.print(" " * 8 + "".join(f"{'e' + str(expert):>7}" for expert in range(experts)))
    utilisation = routed["utilisation"]
    rows = [(f"L{layer}", utilisation["by_layer"][layer]) for layer in range(layers)]
    for label, row in [*rows, ("all", utilisation["overall"])]:
        line = Text(f"{label:<8}")
        for expert in range(experts):
            line.append(f"{row[expert]:>7.1%}", style=_expert_style(expert))
        console.print(line)
    console.print(
        f"mean routing entropy: {routed['mean_entropy']:.3f} nats (0 = always one expert, "
        f"{routed['max_entropy']:.3f} = uniform over all {experts})"
    )


def _accuracy(console: Console, accuracy: dict[str, Any], names: Sequence[str]) -> None:
    labelled = accuracy["prompts"]
    hits = round(accuracy["prompt_accuracy"] * len(labelled))
    console.print(f"\nrouting accuracy on {len(labelled)} labelled prompt(s):")
    console.print(
        f"  prompts reaching their labelled expert: {hits}/{len(labelled)} ({accuracy['prompt_accuracy']:.0%})"
    )
    by_layer = "  ".join(f"L{layer} {value:.0%}" for layer, value in enumerate(accuracy["token_accuracy_by_layer"]))
    console.print(f"  tokens whose top-1 expert is the label: {accuracy['token_accuracy']:.0%} (by layer: {by_layer})")
    for row in accuracy["by_expert"]:
        expert = row["expert"]
        console.print(
            f"  expert {expert} ({names[expert]}): prompts {row['prompt_accuracy']:.0%}, "
            f"tokens {row['token_accuracy']:.0%}",
            style=_expert_style(expert),
        )
    for prompt in labelled:
        if prompt["preferred_expert"] != prompt["label"]:
            console.print(
                f"  miss: {prompt['text']!r} is labelled {prompt['label']} but prefers expert {prompt['preferred_expert']}"
            )


def _token_label(shown: str) -> str:
    """A token as the API shows it, cut to fit the grid's first column."""
    return shown if len(shown) < TOKEN_LABEL else shown[: TOKEN_LABEL - 2] + "…"


def evaluation(report: EvaluationReport, as_json: bool, min_kept: float | None) -> None:
    """eval's table (or JSON with the --min-kept verdict), then each domain below --min-kept on stderr."""
    failing = [] if min_kept is None else report.below(min_kept)
    if as_json:
        value = report.to_dict()
        value["min_kept"] = min_kept
        value["below_min_kept"] = [row.domain for row in failing]
        data(value)
    else:
        _evaluation_table(report)
    for row in failing:
        assert row.kept is not None and min_kept is not None
        typer.secho(
            f"below --min-kept {min_kept:g}: {row.domain} keeps {row.kept:.0%} of {row.best_expert}'s gain",
            err=True,
            fg=typer.colors.RED,
        )


def _evaluation_table(report: EvaluationReport) -> None:
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
