"""The routing check while the writer writes: route the positive prompts through the checkpoint being written,
reading each tensor as soon as it is on disk, and compare the routers used with those written."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from frankenmoe.analysis.routing import RoutingCheck, check_routing, routing_check_skip_reason
from frankenmoe.checkpoint.folder import Checkpoint
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import DTYPES, TensorLocation, read_growing_header, read_tensor
from frankenmoe.merging.plan import MergePlan
from frankenmoe.routers.request import Gates
from frankenmoe.sources.model import read_model_config


class WrittenTensors(Mapping[str, TensorLocation]):
    """The tensors of safetensors shards a writer is writing into `folder`, `shards` naming each one's file.

    Looking a tensor up waits until the writer has written all of its bytes (shards are written front
    to back, so a shard at least `location.end` bytes long holds them) and gives its location in the
    shard, whose own header gives the offsets.
    """

    POLL_SECONDS = 0.005

    def __init__(self, shards: Mapping[str, Path], folder: Path) -> None:
        self._folder = folder
        self._shards = dict(shards)
        self._headers: dict[Path, dict[str, TensorLocation]] = {}
        self._written: dict[Path, int] = {}

    def __getitem__(self, name: str) -> TensorLocation:
        shard = self._shards[name]
        while (header := self._header(shard)) is None:
            self._pause()
        location = header[name]
        while self._written.get(shard, 0) < location.end:
            self._written[shard] = self._size(shard)
            if self._written[shard] < location.end:
                self._pause()
        return location

    def __contains__(self, name: object) -> bool:
        return name in self._shards

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def _header(self, shard: Path) -> dict[str, TensorLocation] | None:
        if shard not in self._headers and shard.is_file():
            header = read_growing_header(shard)
            if header is not None:
                self._headers[shard] = header
        return self._headers.get(shard)

    def _size(self, shard: Path) -> int:
        try:
            return shard.stat().st_size
        except FileNotFoundError:
            return 0

    def _pause(self) -> None:
        if not self._folder.is_dir():
            raise ModelError(f"The staging folder {self._folder} went away while the routing check was reading it.")
        time.sleep(self.POLL_SECONDS)


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
    """The routing check of a merge, run while its checkpoint is being written into `folder`.

    It computes what `check_positive_prompts(folder, ...)` computes after the write, from the same
    bytes: every tensor is read from the staged shards once the writer has written it
    (`WrittenTensors`), the routers are the computed rows cast to the output dtype, taken layer by
    layer as the router computation finishes them (`ComputedRows`), and the tokenizer is loaded from
    a folder holding the files the writer copies plus the output's config.json. It runs layer by
    layer behind both the writer and the router computation. `confirm` then compares the routers it
    used with the ones written.
    """

    def __init__(self, plan: MergePlan, folder: Path, gates_for: Callable[[int], Gates]) -> None:
        self._plan = plan
        self._folder = folder
        self.tensors = WrittenTensors({job.name: folder / plan.shard_name(job.shard) for job in plan.jobs}, folder)
        self.rows = ComputedRows(plan, gates_for)

    def run(self, device: torch.device | None = None) -> RoutingCheck | None:
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
            return check_routing(checkpoint, experts, device, self.rows)

    def confirm(self) -> bool:
        """After the write: whether the routers the check used are the ones in the written checkpoint."""
        return self.rows.matches_written(self.tensors)
