"""The routing check behind the writer: route the positive prompts through the tensors a merge writes, reading
each as soon as it is made, and compare the routers used with those written.

A safetensors merge is checked on its staged shards, each tensor read once the writer publishes it
(`WrittenTensors`); a GGUF merge on the tensors its file encodes before they are quantised, made by the
safetensors writer's own code (`PlannedTensors`). Either way the routers are the computed rows the writer
writes (`ComputedRows`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import torch

from frankenmoe.analysis.routing_check import RoutingCheck, check_routing, routing_check_skip_reason
from frankenmoe.architectures.roles import LAYER_PREFIX
from frankenmoe.checkpoint.folder import Checkpoint
from frankenmoe.io.safetensors import DTYPES, TensorLocation, read_tensor
from frankenmoe.io.shards import tensor_bytes, write_error
from frankenmoe.io.written import WriteLog
from frankenmoe.merging.plan import MergePlan, TensorJob
from frankenmoe.merging.stages import BackgroundResult, gates_of_layer
from frankenmoe.merging.writer import write_job
from frankenmoe.routers.request import GateProgress, Gates
from frankenmoe.sources.model import read_model_config

logger = logging.getLogger("frankenmoe")


class WrittenTensors(Mapping[str, TensorLocation]):
    """The tensors named `names` as a writer publishes them in `written`: looking one up waits until all of
    its bytes are in its shard and gives its location there (ModelError if the writer stops without it)."""

    def __init__(self, written: WriteLog, names: Iterable[str]) -> None:
        self._written = written
        self._names = tuple(names)
        self._known = frozenset(self._names)

    def __getitem__(self, name: str) -> TensorLocation:
        if name not in self._known:
            raise KeyError(name)
        return self._written.wait_for(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_LAYER_NAME = re.compile(re.escape(LAYER_PREFIX).replace(re.escape("{layer}"), r"(\d+)"))


class PlannedTensors(Mapping[str, TensorLocation]):
    """A plan's tensors with the bytes the safetensors writer would write, without writing its shards.

    A tensor the writer copies unchanged from one source tensor is read where the source holds it. Any
    other (transformed, merged, concatenated, converted, zeros, computed from `gates`) is made by the
    writer's own code (`write_job`) into a file of its own in `scratch` when first looked up. Decoders
    read layer by layer, so making a tensor of a later layer removes the files made for earlier ones:
    memory holds one tensor at a time and `scratch` one layer's made tensors. `close` removes `scratch`.
    Lookups come from one thread (the decoder's).
    """

    def __init__(self, plan: MergePlan, scratch: Path, gates: Callable[[], Gates], device: torch.device) -> None:
        self._jobs = {job.name: job for job in plan.jobs}
        self._gate_mode = plan.config.gate_mode
        self._scratch = scratch
        self._gates = gates
        self._device = device
        self._made: dict[str, tuple[int, TensorLocation]] = {}

    def __getitem__(self, name: str) -> TensorLocation:
        job = self._jobs[name]
        copied = _copied_location(job)
        if copied is not None:
            return copied
        if name not in self._made:
            match = _LAYER_NAME.match(name)
            layer = int(match.group(1)) if match else -1
            for earlier in [made for made, (made_layer, _) in self._made.items() if made_layer < layer]:
                self._made.pop(earlier)[1].file.unlink(missing_ok=True)
            self._made[name] = (layer, self._make(job))
        return self._made[name][1]

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def _make(self, job: TensorJob) -> TensorLocation:
        path = self._scratch / f"{job.name}.bin"
        try:
            self._scratch.mkdir(exist_ok=True)
            with path.open("wb") as handle:
                write_job(_FileSink(handle), job, self._gates, self._gate_mode, self._device)
        except OSError as error:
            raise write_error(path, error) from None
        return TensorLocation(job.name, path, job.dtype, job.shape, 0, job.nbytes)

    def close(self) -> None:
        """Remove every file made (and `scratch`)."""
        self._made.clear()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _copied_location(job: TensorJob) -> TensorLocation | None:
    """Where the source holds a tensor the writer copies byte for byte, None for a tensor it makes."""
    if job.computed is not None or job.merged is not None or len(job.pieces) != 1:
        return None
    piece = job.pieces[0]
    if not piece.copies_bytes(job.dtype):
        return None
    return replace(piece.location, name=job.name, shape=job.shape)


class _FileSink:
    """One tensor's bytes into an open file (a TensorSink)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def write_bytes(self, data: memoryview | bytes) -> None:
        self._handle.write(data)

    def copy_bytes(self, location: TensorLocation) -> None:
        self.write_bytes(tensor_bytes(read_tensor(location)))


class ComputedRows(Mapping[str, torch.Tensor]):
    """A merge's routers and shared-expert gates as the writer will write them (the computed rows cast
    to the output dtype), each waited for until `gates_for(layer)` has that layer's rows.

    `used` keeps what was handed out, so that `matches_written` can compare it with the checkpoint.
    """

    def __init__(self, plan: MergePlan, gates_for: Callable[[int], Gates]) -> None:
        self._jobs = {job.name: job for job in plan.jobs if job.computed is not None}
        self._gates_for = gates_for
        self.used: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        job = self._jobs[name]
        if name not in self.used:
            assert job.computed is not None
            rows = self._gates_for(job.computed.layer).rows(job.computed.kind, job.computed.layer)
            self.used[name] = rows.to(DTYPES[job.dtype][0]).reshape(job.shape).clone()
        return self.used[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def matches_written(self, checkpoint: Mapping[str, TensorLocation]) -> bool:
        """Whether every tensor handed out has the very bytes the checkpoint holds under its name."""
        return all(
            torch.equal(read_tensor(checkpoint[name]).view(torch.uint8), used.view(torch.uint8))
            for name, used in self.used.items()
        )


class RoutingCheckWhileWriting:
    """The routing check of a merge, run on a thread of its own (`started`) while its tensors are being written.

    It computes what `check_routing` (frankenmoe.analysis.routing_check) computes on the finished safetensors output,
    from the same bytes: every tensor is read from `tensors` (`WrittenTensors` or `PlannedTensors`), the
    routers are the computed rows cast to the output dtype, taken layer by layer as the router computation
    (`gates`, reporting to `progress`) finishes them (`ComputedRows`), and the tokenizer is loaded from a
    folder holding the files the writer copies plus the output's config.json. It runs layer by layer
    behind both the writer and the router computation. `result` then compares the routers it used with
    the ones written.
    """

    def __init__(
        self,
        plan: MergePlan,
        tensors: Mapping[str, TensorLocation],
        gates: BackgroundResult[Gates],
        progress: GateProgress,
        device: torch.device,
        started: bool = True,
    ) -> None:
        self._plan = plan
        self._device = device
        self.tensors = tensors
        self.rows = ComputedRows(plan, lambda layer: gates_of_layer(gates, progress, layer))
        self._background = BackgroundResult(self.run, "frankenmoe-check") if started else None

    def run(self, computed_rows: bool = True) -> RoutingCheck | None:
        """The check; with `computed_rows` off, the routers are read from `tensors` like every other tensor."""
        experts = self._plan.config.experts
        with tempfile.TemporaryDirectory(prefix="frankenmoe-check-") as scratch:
            tokenizer_folder = Path(scratch)
            for source in self._plan.tokenizer_files:
                shutil.copyfile(source, tokenizer_folder / source.name)
            (tokenizer_folder / "config.json").write_text(
                json.dumps(self._plan.output_config, indent=2) + "\n", encoding="utf-8"
            )
            if routing_check_skip_reason(tokenizer_folder, experts) is not None:
                return None
            config = read_model_config(str(tokenizer_folder), tokenizer_folder)
            architecture = self._plan.architecture
            checkpoint = Checkpoint(tokenizer_folder, config, self.tensors, architecture, self._plan.layout)
            return check_routing(checkpoint, experts, self._device, self.rows if computed_rows else None)

    def cancel(self) -> None:
        """Stop the check (the write failed); it must not be waiting for the writer (see WriteLog.fail)."""
        if self._background is not None:
            self._background.cancel()

    def result(self) -> RoutingCheck | None:
        """After the write: the check (None when it was not started or cannot run), or, if the routers it used
        are not the ones written (never seen), the check run again on the written routers."""
        during = None if self._background is None else self._background.result()
        if during is None or self.rows.matches_written(self.tensors):
            return during
        logger.warning("The routing check saw other routers than the ones written; running it again.")
        return self.run(computed_rows=False)
