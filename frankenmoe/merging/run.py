"""The merge, start to finish: config -> sources -> checks -> plan -> routers -> staged write."""

from __future__ import annotations

import itertools

from frankenmoe.analysis.routing_check import routing_check_markdown
from frankenmoe.checkpoint.output_folder import check_complete, staged_output
from frankenmoe.io.read_ahead import ReadAhead
from frankenmoe.io.written import WriteLog
from frankenmoe.merging.card import laser_sections, model_card
from frankenmoe.merging.prepare import MergeResult, PreparedMerge
from frankenmoe.merging.routing_check import RoutingCheckWhileWriting, WrittenTensors
from frankenmoe.merging.stages import (
    compute_gates_in_background,
    execution_start,
    output_files,
    record_merge,
)
from frankenmoe.merging.timing import stage
from frankenmoe.merging.writer import check_written_shards, write_checkpoint, write_text_file
from frankenmoe.sources.hub import download


def execute_merge(prepared: PreparedMerge) -> MergeResult:
    """Compute the routers, write the checkpoint into a staging folder, verify it, move it to OUT.

    Unless `options.check_routing` is off, the experts' positive prompts are routed through the staged
    checkpoint and the result is added to its model card, which is written once, after the check. The
    build record (MANIFEST_NAME) is the last file written before the swap.
    """
    if prepared.downloads:
        # Every check ran before this: only the weight files the merge reads are fetched, into the HF cache.
        download(prepared.downloads, prepared.options.show_progress)
    if prepared.gguf is not None:
        from frankenmoe.merging.gguf import execute_gguf_merge

        return execute_gguf_merge(prepared, prepared.gguf)
    options, out = prepared.options, prepared.out
    plan, (request, timings) = prepared.plan, execution_start(prepared)
    # Whether OUT's checkpoint may be replaced is this plan's own --force, never another plan's.
    with staged_output(out, replace_checkpoint=options.force) as staging:
        with stage("writing", timings):
            request, progress, gates = compute_gates_in_background(plan.config.gate_mode, request)
            # The writer publishes each tensor it has written in `written`; the routing check reads them from
            # there behind the writer and the router computation (RoutingCheckWhileWriting).
            written = WriteLog()
            tensors = WrittenTensors(written, (job.name for job in plan.jobs))
            check = RoutingCheckWhileWriting(plan, tensors, gates, progress, request.device, options.check_routing)
            # From a cold page cache, the sources are read ahead of the writer (ReadAhead).
            starts = itertools.accumulate((job.nbytes for job in plan.jobs), initial=0)
            pieces = [
                (start, piece.location) for start, job in zip(starts, plan.jobs, strict=False) for piece in job.pieces
            ]
            read_ahead = ReadAhead(pieces, written)
            try:
                records = write_checkpoint(plan, gates.result, staging, written, request.device, options.show_progress)
            except BaseException:
                check.cancel()  # the writer failed `written`, so the check is not left waiting for a tensor
                raise
            finally:
                read_ahead.join()
        with stage("verifying", timings):
            check_written_shards(plan, staging)
        with stage("routing_check", timings):
            routing_check = check.result()
        checked = () if routing_check is None else (routing_check_markdown(routing_check),)
        card = model_card(plan, prepared.config_text, (*laser_sections(plan.laser_results), *checked))
        records["README.md"] = write_text_file(staging / "README.md", card)
        check_complete(staging, output_files(plan))
        result = record_merge(prepared, staging, records, timings, routing_check)
    return result
