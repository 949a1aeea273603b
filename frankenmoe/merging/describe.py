"""What a planned or finished merge says about itself, as lines of text (the CLI prints them).

Built here, next to the plan, so that a client shows a merge without reading the plan's internals:
`describe_plan` is `frankenmoe merge`'s summary (every tensor too, for --dry-run) and
`describe_result` its closing lines.
"""

from __future__ import annotations

from frankenmoe.analysis.routing_check import routing_check_lines, routing_check_skip_reason
from frankenmoe.io.safetensors import SAFETENSORS_TO_CONFIG_DTYPE
from frankenmoe.io.sizes import format_bytes
from frankenmoe.merging.card import router_summary
from frankenmoe.merging.laser_plan import LaserGroup, LaserResult
from frankenmoe.merging.origins import computed_origin, shared_weights_origin
from frankenmoe.merging.plan import MergePlan, TensorJob
from frankenmoe.merging.prepare import MergeResult, PreparedMerge
from frankenmoe.sources.model import SourceModel, weight_formats_summary


def describe_plan(prepared: PreparedMerge, detailed: bool = False) -> tuple[str, ...]:
    """The merge's sources, architecture, options and sizes; with `detailed`, every tensor and where it comes from."""
    plan = prepared.plan
    lines = [f"base model: {plan.base.reference} ({plan.base.path})"]
    for index, expert in enumerate(plan.experts):
        lines.append(f"expert {index}: {expert.reference} ({expert.path}){_adapter_note(expert)}")
    if plan.shared_expert is not None:
        shared = plan.shared_expert
        lines.append(f"shared expert: {shared.reference} ({shared.path}){_adapter_note(shared)}")
    lines.append(
        f"architecture: {plan.architecture.model_type} ({plan.architecture_reason}); tensor layout: {plan.layout.name}"
    )
    if plan.architecture.shared_expert is not None:
        lines.append(f"shared-expert gate: {computed_origin(plan, 'shared_expert_gate')}")
    if plan.skipped_tensors:
        lines.append(
            f"skipped: {len(plan.skipped_tensors)} tensor(s) of the base model that every loader derives "
            f"(rotary inv_freq buffers, a tied lm_head): {', '.join(plan.skipped_tensors[:3])}"
            + (" ..." if len(plan.skipped_tensors) > 3 else "")
        )
    lines += [
        f"source weights: {weight_formats_summary((plan.base, *plan.experts))}",
        f"gate mode: {plan.config.gate_mode_description}; experts per token: {plan.config.experts_per_token}; "
        f"dtype: {SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype]}",
        f"router prompts: {router_summary(plan.config)}",
        f"shared weights: {shared_weights_origin(plan)}",
        f"parameters: {plan.total_parameters:,} total, {plan.active_parameters:,} active per token",
        f"tensors: {len(plan.jobs)} in {plan.shard_count} shard(s); output {format_bytes(plan.output_bytes)}; "
        f"free on disk {format_bytes(prepared.free_bytes)}",
    ]
    lines += _hub_lines(prepared)
    lines += [_laser_lines(group, plan.laser_results, detailed) for group in plan.laser_groups]
    lines += _gguf_lines(prepared, detailed)
    if detailed:
        lines.append("\nshard  dtype  shape                 tensor  <-  source")
        lines += [_job_line(plan, job) for job in plan.jobs]
    return tuple(lines)


def _laser_lines(group: LaserGroup, results: tuple[LaserResult, ...], detailed: bool) -> str:
    """One line per laser block; with `detailed` (the dry run), every considered matrix's decision, as the
    model card's laser table shows it: shape, tensor, SNR, rank before -> rank kept, and the verdict."""
    settings = group.settings
    options = [f"method {settings.method}"]
    if settings.top_k is not None:
        options.append(f"top_k {settings.top_k}")
    if settings.keep_fraction is not None:
        options.append(f"keep_fraction {settings.keep_fraction}")
    if settings.calibration is not None:
        options.append(f"calibration {settings.calibration}")
    decided = [result for result in results if result.group == group.path]
    reduced = sum(result.reduced for result in decided)
    lines = [f"laser {group.path} ({', '.join(options)}): {len(group.matrices)} matrices considered, {reduced} reduced"]
    if detailed:
        lines.extend(
            f"  {'x'.join(map(str, matrix.location.shape)):<12} {matrix.location.name}  SNR {result.snr:.4g}  "
            f"rank {result.rank_before} -> {result.rank_after}  {result.note}"
            for matrix, result in zip(group.matrices, decided, strict=True)
        )
    return "\n".join(lines)


def _hub_lines(prepared: PreparedMerge) -> list[str]:
    plan = prepared.plan
    if not prepared.downloads and all(source.hub is None for source in (plan.base, *plan.experts)):
        return []
    from frankenmoe.sources.hub import describe_downloads, describe_streams

    lines = ["\n".join(describe_downloads(prepared.downloads))]
    if prepared.options.stream_sources:
        lines.append("\n".join(describe_streams(prepared.streams)))
    return lines


def _gguf_lines(prepared: PreparedMerge, detailed: bool) -> list[str]:
    gguf = prepared.gguf
    if gguf is None:
        return []
    from frankenmoe.merging.gguf_plan import describe_gguf_tensor

    lines = [
        f"GGUF: {gguf.file_name} ({gguf.architecture.name}), {len(gguf.tensors)} tensors, "
        f"{format_bytes(gguf.data_bytes)}; tokenizer {gguf.vocabulary.model} (pre-tokenizer {gguf.vocabulary.pre}); "
        f"{len(gguf.fallbacks)} tensor(s) fall back to F16"
    ]
    if detailed:
        lines.append("\nGGUF tensor                              shape                  type")
        lines.append("\n".join(describe_gguf_tensor(tensor) for tensor in gguf.tensors))
    return lines


def _job_line(plan: MergePlan, job: TensorJob) -> str:
    if job.computed is not None:
        origin = f"computed {job.computed.kind.replace('_', ' ')}: {computed_origin(plan, job.computed.kind)}"
    elif job.merged is not None:
        origin = f"merged from the base and {len(job.merged.sources)} expert(s): {job.merged.describe()}"
    elif job.origin == "zeros":
        origin = "zeros (no source has this tensor)"
    else:
        origin = ", ".join(f"{piece.location.file.parent.name}/{piece.location.name}" for piece in job.pieces)
    shape = "x".join(map(str, job.shape))
    return f"{job.shard + 1:>5}  {job.dtype:<5}  {shape:<20}  {job.name}  <-  {origin}"


def describe_result(prepared: PreparedMerge, result: MergeResult) -> tuple[str, ...]:
    """What a finished merge wrote and how its routing check went (or why it was skipped)."""
    out = prepared.out
    if prepared.gguf is not None:
        target = out / prepared.gguf.file_name
        lines = [
            f"Wrote {format_bytes(result.output_bytes)} to {target}",
            f"Run it: llama-cli -m {target} (or Ollama: see {out / 'README.md'})",
        ]
    else:
        lines = [f"Wrote {format_bytes(result.output_bytes)} in {prepared.plan.shard_count} shard(s) to {out}"]
    if result.routing_check is not None:
        lines.append("\n".join(routing_check_lines(result.routing_check)))
    elif prepared.options.check_routing:
        lines.append(routing_check_skip_reason(out, prepared.plan.config.experts) or "")
    return tuple(lines)


def _adapter_note(source: SourceModel) -> str:
    """'' or '; LoRA ...: rank, scale...' to follow the model's name in the dry run."""
    return "" if source.adapter is None else f"; {source.adapter.summary()}"
