"""What both output formats run the same way: the start, work in the background, and the manifest."""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import torch

from frankenmoe.analysis.routing_check import RoutingCheck
from frankenmoe.checkpoint.manifest import FileRecord, build_manifest, source_records, write_manifest
from frankenmoe.io.safetensors import INDEX_NAME
from frankenmoe.merging.plan import MergePlan
from frankenmoe.merging.prepare import MergeResult, PreparedMerge, gate_request
from frankenmoe.routers import compute_gates
from frankenmoe.routers.request import GateProgress, GateRequest, Gates
from frankenmoe.runtime.compat import raise_in_thread

T = TypeVar("T")


def execution_start(prepared: PreparedMerge) -> tuple[GateRequest, dict[str, float]]:
    """What both output formats start executing with: the routers' request, and the timings of preparing the
    merge (planning, laser) that the later stages add to."""
    return gate_request(prepared.plan, prepared.options), dict(prepared.timings)


def record_merge(
    prepared: PreparedMerge,
    staging: Path,
    records: dict[str, FileRecord],
    timings: dict[str, float],
    routing_check: RoutingCheck | None,
) -> MergeResult:
    """Write the build record into the staged output (its last file, before the swap) and say what was merged.

    Both output formats end here: `prepared.plan` is the one that ran (laser ranks included), `records` every
    file written.
    """
    plan = prepared.plan
    timings["total"] = sum(timings.values())
    manifest = build_manifest(
        config_text=prepared.config_text,
        sources=source_records(plan.base, plan.experts, plan.shared_expert, prepared.options.hash_sources),
        options=prepared.options.recorded(plan),
        architecture=plan.architecture.model_type,
        files=list(records.values()),
        timings=timings,
    )
    write_manifest(staging, manifest)
    return MergeResult(
        out=prepared.out,
        architecture=plan.architecture.model_type,
        files=tuple(records.values()),
        total_parameters=plan.total_parameters,
        active_parameters=plan.active_parameters,
        timings=timings,
        routing_check=routing_check,
        laser_results=plan.laser_results,
        manifest=manifest,
    )


class BackgroundResult(Generic[T]):
    """Runs `compute` on a daemon thread while the caller goes on; `result()` waits for it.

    The router computation and the routing check run this way, so that their CPU work overlaps the
    writer's disk work. Each thread uses one intra-op thread; their matrix work goes to the slice
    workers (decoder.slices.map_slices), whose results do not depend on how many there are, so router rows
    are bit-identical whatever the machine's thread count. An exception in it is re-raised by `result()`.

    When the caller stops early (Ctrl-C, SIGTERM, an error), the thread is cancelled and joined: by
    `result()` if the wait itself is interrupted, otherwise at interpreter exit. It must not be left
    running into the interpreter's finalisation: a thread stopped there inside torch makes the process
    abort ("terminate called without an active exception", exit 134) instead of exiting as the CLI chose.
    """

    class Cancelled(BaseException):
        """Raised inside the thread by cancel(); not an Exception, so no `except Exception` in a router swallows it."""

    JOIN_SECONDS = 30.0
    """How long cancel() waits: the thread stops after its current torch call, which takes far less."""

    def __init__(self, compute: Callable[[], T], name: str = "frankenmoe-routers") -> None:
        self._compute = compute
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # atexit handlers run before finalisation, while the thread can still run to its end.
        atexit.register(BackgroundResult._cancel_if_alive, weakref.ref(self))
        self._thread.start()

    def _run(self) -> None:
        try:
            torch.set_num_threads(1)
            self._value = self._compute()
        except BackgroundResult.Cancelled:
            pass  # nobody waits for the value any more
        except BaseException as error:  # handed to the caller's thread by result()
            self._error = error
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        """Whether the computation has ended (with a value or an error)."""
        return self._done.is_set()

    def result(self) -> T:
        try:
            while not self._done.wait(timeout=0.1):
                pass  # short waits keep the main thread responsive to Ctrl-C
        except BaseException:
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        return cast(T, self._value)

    def cancel(self) -> None:
        """Stop the computation at its next Python instruction and wait for the thread to end.

        The gate modes are Python loops over torch calls, so the exception lands between two calls,
        where a cancellation flag would be polled, without every gate mode having to poll one.
        """
        if not self._thread.is_alive():
            return
        raise_in_thread(self._thread, BackgroundResult.Cancelled)
        self._thread.join(self.JOIN_SECONDS)

    @staticmethod
    def _cancel_if_alive(reference: weakref.ref[BackgroundResult[Any]]) -> None:
        background = reference()
        if background is not None:
            background.cancel()


def compute_gates_in_background(
    gate_mode: str, request: GateRequest
) -> tuple[GateRequest, GateProgress, BackgroundResult[Gates]]:
    """Start the router computation on a thread of its own. A layerwise gate mode publishes each finished
    layer's rows to the returned progress, which is closed when the computation ends, finished or failed,
    so that no reader waits for rows that will never come."""
    progress = GateProgress()
    request = replace(request, progress=progress)

    def compute() -> Gates:
        try:
            return compute_gates(gate_mode, request)
        finally:
            progress.close()

    return request, progress, BackgroundResult(compute)


def gates_of_layer(gates: BackgroundResult[Gates], progress: GateProgress, layer: int) -> Gates:
    """Gates whose rows of `layer` are final: as soon as a layerwise mode publishes them, else when done."""
    published = progress.wait_for(layer)
    return published if published is not None else gates.result()


def output_files(plan: MergePlan) -> list[str]:
    """Every file a finished checkpoint holds: shards, index, config, tokenizer files, model card."""
    shards = [plan.shard_name(shard) for shard in range(plan.shard_count)]
    return [*shards, INDEX_NAME, "config.json", *(source.name for source in plan.tokenizer_files), "README.md"]
