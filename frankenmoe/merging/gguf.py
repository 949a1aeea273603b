"""A merge written straight to one GGUF file (`--format gguf`), and `convert` of a finished checkpoint.

The GGUF is made from the same merge plan as the safetensors output (frankenmoe.merging.gguf_writer writes
it). The file goes into the same staging folder, with the same routing check, manifest, model card and
atomic swap as a safetensors merge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.errors import ModelError, OutputError
from frankenmoe.merging.gguf_plan import GgufPlan, gguf_card_section, gguf_plan_for, gguf_problems, gguf_type
from frankenmoe.merging.gguf_writer import write_gguf
from frankenmoe.merging.plan import TensorJob, TensorPiece
from frankenmoe.merging.stages import compute_gates_in_background
from frankenmoe.routers.request import Gates

if TYPE_CHECKING:
    from frankenmoe.merging.prepare import MergeResult, PreparedMerge


def execute_gguf_merge(prepared: PreparedMerge, gplan: GgufPlan) -> MergeResult:
    """Compute the routers and write OUT as one GGUF file, with config.json, model card and manifest.

    The same stages as a safetensors merge (`run.execute_merge`): routers computed on their own thread
    while the other tensors stream, the routing check behind them, staging folder, model card written
    once the check is done, manifest written last, atomic swap. The check routes the prompts through the
    tensors the file encodes, made as the safetensors writer makes them, before quantisation
    (`PlannedTensors`: the few it must make go into a scratch folder in the staging folder, one layer's
    at a time, removed when the check ends).
    """
    from tqdm import tqdm

    from frankenmoe.analysis.routing_check import routing_check_markdown
    from frankenmoe.checkpoint.output_folder import check_complete, staged_output
    from frankenmoe.merging.card import laser_sections, model_card
    from frankenmoe.merging.routing_check import PlannedTensors, RoutingCheckWhileWriting
    from frankenmoe.merging.stages import execution_start, record_merge
    from frankenmoe.merging.timing import stage
    from frankenmoe.merging.writer import write_text_file

    options = prepared.options
    plan, (request, timings) = prepared.plan, execution_start(prepared)
    # Whether OUT's checkpoint may be replaced is this merge's own --force, as for a safetensors output.
    with staged_output(prepared.out, replace_checkpoint=options.force) as staging:
        with stage("writing", timings):
            request, progress, gates = compute_gates_in_background(plan.config.gate_mode, request)
            tensors = PlannedTensors(plan, staging / CHECK_SCRATCH, gates.result, request.device)
            check = RoutingCheckWhileWriting(plan, tensors, gates, progress, request.device, options.check_routing)
            try:
                with tqdm(
                    total=gplan.data_bytes, desc="writing", unit="B", unit_scale=True, disable=not options.show_progress
                ) as bar:
                    record = write_gguf(gplan, gates.result, staging / gplan.file_name, request.device, bar.update)
            except BaseException:
                check.cancel()
                raise
            records = {record.name: record}
            records["config.json"] = write_text_file(
                staging / "config.json", json.dumps(plan.output_config, indent=2) + "\n"
            )
        with stage("verifying", timings):
            problems = gguf_problems(staging / gplan.file_name, gplan)
            if problems:
                check.cancel()  # it makes files in the staging folder, which is about to be removed
                raise OutputError(f"Verification of {gplan.file_name} failed: {problems[0]}.")
        with stage("routing_check", timings):
            try:
                routing_check = check.result()
            finally:
                tensors.close()
        checked = (
            () if routing_check is None else (routing_check_markdown(routing_check, reproducible_with_route=False),)
        )
        sections = (*laser_sections(plan.laser_results), *checked, gguf_card_section(gplan, routing_check is not None))
        records["README.md"] = write_text_file(staging / "README.md", model_card(plan, prepared.config_text, sections))
        check_complete(staging, list(records))
        result = record_merge(prepared, staging, records, timings, routing_check)
    return result


CHECK_SCRATCH = ".routing-check"
"""The folder in the staging folder where the routing check of a GGUF merge makes the tensors the writer
transforms (one layer's at a time); removed before the swap."""


def convert_checkpoint(checkpoint: Path, type_name: str, output: Path | None = None) -> FileRecord:
    """Write the GGUF of a frankenmoe safetensors checkpoint (the file `--format gguf` writes for its merge).

    The file goes to `output` (default: CHECKPOINT-<TYPE>.gguf beside the folder, so that the checkpoint's
    manifest still lists all it holds), written under a temporary name and renamed once complete.
    """
    from frankenmoe.architectures.expected import detect_layout
    from frankenmoe.architectures.tables import OUTPUT_ARCHITECTURES
    from frankenmoe.checkpoint.output_folder import check_free_space
    from frankenmoe.io.safetensors import INDEX_NAME, read_header

    entry = gguf_type(type_name)
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        weight_map = json.loads((checkpoint / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"{checkpoint} is not a frankenmoe safetensors checkpoint (config.json and {INDEX_NAME} are needed: "
            f"{error}). Pass the folder a merge wrote."
        ) from None
    architecture = OUTPUT_ARCHITECTURES.get(str(config.get("model_type")))
    if architecture is None:
        raise ModelError(f"{checkpoint}'s model_type {config.get('model_type')!r} is not a frankenmoe output.")
    locations = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        locations.update(read_header(checkpoint / Path(shard).name))
    jobs = tuple(
        TensorJob(name, location.dtype, location.shape, 0, (TensorPiece(location),))
        for name, location in locations.items()
    )
    layout = detect_layout(architecture, locations)
    target = output or checkpoint.parent / f"{checkpoint.name}-{entry.tensor_type.name}.gguf"
    gplan = gguf_plan_for(jobs, config, architecture, layout, entry.name, checkpoint.name, checkpoint)
    check_free_space(target, gplan.data_bytes)
    partial = target.with_name(f".{target.name}.frankenmoe-partial")

    def no_gates() -> Gates:
        raise AssertionError("a checkpoint's routers are stored tensors")

    try:
        record = write_gguf(gplan, no_gates, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return FileRecord(target.name, record.size, record.sha256)
