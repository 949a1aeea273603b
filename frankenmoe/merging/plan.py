"""The merge plan: every output tensor, where its bytes come from, its shape, dtype and shard.

The plan is a value: `planning.build_plan` makes it from configs and safetensors headers (so every
check that can fail on bad input runs before a byte is written), `planning.decide_lasers` adds what
laser's analysis decided, and the writer executes it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.tables import OutputArchitecture, OutputLayout
from frankenmoe.config.schema import MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.io.safetensors import TensorLocation, tensor_nbytes
from frankenmoe.merging.laser_plan import LaserGroup, LaserResult, LaserTarget
from frankenmoe.sources.lora import LoraDelta
from frankenmoe.sources.model import SourceModel
from frankenmoe.sources.trunk import TrunkMerge

DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class TensorPiece:
    """One source tensor feeding an output tensor, with the expert transforms to apply to it."""

    location: TensorLocation
    noise_scale: float | None = None
    multiplier: float | None = None
    noise_seed: int = 0
    laser: LaserTarget | None = None
    lora: LoraDelta | None = None
    """A LoRA adapter's delta, added first: laser, noise and multiplier then act on W + scale * B @ A."""

    @property
    def transformed(self) -> bool:
        laser_reduces = self.laser is not None and self.laser.reduces
        return bool(self.noise_scale) or self.multiplier not in (None, 1.0) or laser_reduces or self.lora is not None

    def copies_bytes(self, dtype: str) -> bool:
        """Whether a tensor of `dtype` takes this piece's source bytes unchanged (untransformed, same dtype)."""
        return not self.transformed and self.location.dtype == dtype


@dataclass(frozen=True)
class Computed:
    """A tensor whose rows the merge computes: a layer's router, or its shared expert's sigmoid gate."""

    kind: str
    """"router" or "shared_expert_gate"."""
    layer: int


@dataclass(frozen=True)
class TensorJob:
    """One output tensor and how its bytes are made (see `origin`).

    Pieces are concatenated along the first dimension, then reshaped. Computed tensors come last in
    the plan, so the writer can copy every other tensor while their rows are still being computed.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    pieces: tuple[TensorPiece, ...] = ()
    computed: Computed | None = None
    merged: TrunkMerge | None = None
    """A shared tensor made from the base and the experts (`shared_weights`), row block by row block."""

    @property
    def origin(self) -> str:
        """copied (one source tensor), concatenated (several), computed, merged (a shared tensor from the base
        and the experts), or zeros (a slot the source lacks)."""
        if self.computed is not None:
            return "computed"
        if self.merged is not None:
            return "merged"
        if not self.pieces:
            return "zeros"
        return "copied" if len(self.pieces) == 1 else "concatenated"

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def parameters(self) -> int:
        return self.nbytes // tensor_nbytes(self.dtype, (1,))


@dataclass(frozen=True)
class MergePlan:
    config: MergeConfig
    base: SourceModel
    experts: tuple[SourceModel, ...]
    architecture: OutputArchitecture
    architecture_reason: str
    layout: OutputLayout
    dtype: str
    jobs: tuple[TensorJob, ...]
    shard_count: int
    output_config: dict[str, Any]
    tokenizer_files: tuple[Path, ...]
    total_parameters: int
    active_parameters: int
    shared_expert: SourceModel | None = None
    skipped_tensors: tuple[str, ...] = ()
    """Base-model buffers no output needs because they are recomputed from the config (inv_freq)."""
    laser_groups: tuple[LaserGroup, ...] = ()
    laser_results: tuple[LaserResult, ...] = ()
    """Every considered matrix's decision, in block then matrix order; its pieces' `laser.keep_rank` apply them."""

    @property
    def output_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def shard_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.shard_count:05d}.safetensors"

    def shard_jobs(self, shard: int) -> list[TensorJob]:
        return [job for job in self.jobs if job.shard == shard]

    @property
    def trunk_merges(self) -> dict[str, TrunkMerge]:
        """The merged shared tensors by name, for forward passes that must see the merged trunk."""
        return {job.name: job.merged for job in self.jobs if job.merged is not None}


def parse_size(text: str, what: str = "Shard size", minimum: int = 1) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count; `what` names the value in errors.

    >>> parse_size("2GiB")
    2147483648
    """
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(
            f"{what} {text!r} is not a size. Use a byte count or a value like 5GB, 500MB, 2GiB."
        ) from None
    if value < minimum:
        raise ConfigError(f"{what} {text!r} must be at least {minimum} byte{'s' if minimum != 1 else ''}.")
    return int(value)
