"""The merge, start to finish: config -> sources -> checks -> plan -> routers -> staged write."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from frankenmoe.analysis.routing import RoutingCheck, check_positive_prompts, routing_check_markdown
from frankenmoe.checkpoint.output_folder import check_complete, staged_output
from frankenmoe.io.safetensors import ReadAhead
from frankenmoe.merging.card import laser_sections, model_card
from frankenmoe.merging.prepare import MergeResult, PreparedMerge
from frankenmoe.merging.routing_check import RoutingCheckWhileWriting
from frankenmoe.merging.stages import BackgroundResult, gates_of_layer, output_files, record_merge, run_lasers, stage
from frankenmoe.merging.writer import verify_checkpoint, write_checkpoint, write_text_file
from frankenmoe.routers import compute_gates
from frankenmoe.routers.request import GateProgress
from frankenmoe.sources.hub import download

if TYPE_CHECKING:
    pass

logger = logging.getLogger("frankenmoe")


def execute_merge(prepared: PreparedMerge) -> MergeResult:
    """Compute the routers, write the checkpoint into a staging folder, verify it, move it to OUT.

    Unless `options.check_routing` is off, the experts' positive prompts are routed through the staged
    checkpoint and the result is added to its model card. The build record (MANIFEST_NAME) is the
    last file written before the swap.
    """
    if prepared.downloads:
        # Every check ran before this: only the weight files the merge reads are fetched, into the HF cache.
        download(prepared.downloads, prepared.options.show_progress)
    if prepared.gguf is not None:
        from frankenmoe.merging.gguf import execute_gguf_merge

        return execute_gguf_merge(prepared, prepared.gguf)
    options, out = prepared.options, prepared.out
    plan, request, laser_results, timings = run_lasers(prepared)
    card_sections = laser_sections(laser_results)
    card = model_card(plan, prepared.config_text, card_sections)
    # Whether OUT's checkpoint may be replaced is this plan's own --force, never another plan's.
    with staged_output(out, replace_checkpoint=options.force) as staging:
        with stage("writing", timings):
            progress = GateProgress()
            request = replace(request, progress=progress)
            gates = BackgroundResult(lambda: compute_gates(plan.config.gate_mode, request))
            # The routing check runs behind the writer and the router computation (RoutingCheckWhileWriting).
            checking = RoutingCheckWhileWriting(plan, staging, lambda layer: gates_of_layer(gates, progress, layer))
            check: BackgroundResult[RoutingCheck | None] | None = None
            if options.check_routing:
                check = BackgroundResult(lambda: checking.run(request.device), "frankenmoe-check")
            # From a cold page cache, the sources are read ahead of the writer (ReadAhead).
            starts = itertools.accumulate((job.nbytes for job in plan.jobs), initial=0)
            pieces = [
                (start, piece.location) for start, job in zip(starts, plan.jobs, strict=False) for piece in job.pieces
            ]
            read_ahead = ReadAhead(pieces, [staging / plan.shard_name(shard) for shard in range(plan.shard_count)])
            try:
                records = write_checkpoint(plan, gates.result, staging, card, request.device, options.show_progress)
            except BaseException:
                if check is not None:
                    check.cancel()
                raise
            finally:
                read_ahead.stop()
        with stage("verifying", timings):
            verify_checkpoint(plan, staging)
        routing_check = None
        with stage("routing_check", timings):
            if check is not None:
                routing_check = check.result()
                if not checking.confirm():  # never seen: the routers used are the ones written, read back here
                    logger.warning("The routing check saw other routers than the ones written; running it again.")
                    routing_check = check_positive_prompts(staging, plan.config.experts, request.device)
            if routing_check is not None:
                card = model_card(plan, prepared.config_text, (*card_sections, routing_check_markdown(routing_check)))
                records["README.md"] = write_text_file(staging / "README.md", card)
        check_complete(staging, output_files(plan))
        result = record_merge(prepared, plan, staging, records, timings, laser_results, routing_check)
    return result
