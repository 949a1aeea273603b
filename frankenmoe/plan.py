"""The merge plan: every output tensor, where its bytes come from, its shape, dtype and shard.

Building a plan reads only configs and safetensors headers, so every check that can fail on bad
input runs here, before a byte is written. The plan is a pure value; `write.py` executes it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe import __version__
from frankenmoe.architectures import MIXTRAL_CONFIG_FIELDS, OUTPUT_LAYOUTS, TOKENIZER_FILES, OutputLayout
from frankenmoe.config import MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.laser import LaserGroup, LaserTarget, laser_group
from frankenmoe.sources import SourceModel
from frankenmoe.tensor_io import CONFIG_DTYPE_TO_SAFETENSORS, TensorLocation, tensor_nbytes

DEFAULT_SHARD_BYTES = 5 * 10**9
SAFETENSORS_TO_CONFIG_DTYPE = {value: key for key, value in CONFIG_DTYPE_TO_SAFETENSORS.items()}


@dataclass(frozen=True)
class TensorPiece:
    """One source tensor feeding an output tensor, with the expert transforms to apply to it."""

    location: TensorLocation
    noise_scale: float | None = None
    multiplier: float | None = None
    noise_seed: int = 0
    laser: LaserTarget | None = None

    @property
    def transformed(self) -> bool:
        laser_reduces = self.laser is not None and self.laser.reduces
        return bool(self.noise_scale) or self.multiplier not in (None, 1.0) or laser_reduces


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its pieces are concatenated along the first dimension, then reshaped.

    A job with no pieces is a router (gate). Routers come last in the plan, so the writer can copy
    every other tensor while the router rows are still being computed.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    pieces: tuple[TensorPiece, ...] = ()
    router_layer: int | None = None

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
    layout: OutputLayout
    dtype: str
    jobs: tuple[TensorJob, ...]
    shard_count: int
    output_config: dict[str, Any]
    tokenizer_files: tuple[Path, ...]
    total_parameters: int
    active_parameters: int
    laser_groups: tuple[LaserGroup, ...] = ()

    @property
    def output_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def shard_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.shard_count:05d}.safetensors"

    def shard_jobs(self, shard: int) -> list[TensorJob]:
        return [job for job in self.jobs if job.shard == shard]


def build_plan(
    config: MergeConfig,
    base: SourceModel,
    experts: tuple[SourceModel, ...],
    *,
    layout_name: str = "classic",
    dtype_override: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
) -> MergePlan:
    """Decide every output tensor and its shard; reads nothing but the sources' indexes."""
    layout = OUTPUT_LAYOUTS[layout_name]
    dtype = CONFIG_DTYPE_TO_SAFETENSORS[dtype_override or config.dtype or _base_dtype(base)]
    shape = base.shape
    family = base.family
    unsharded: list[tuple[str, tuple[int, ...], tuple[TensorPiece, ...], int | None]] = []
    expert_lasers = {
        index: laser_group(f"experts[{index}].laser", settings.laser, experts[index])
        for index, settings in enumerate(config.experts)
        if settings.laser is not None
    }
    base_laser = None if config.base_laser is None else laser_group("base_laser", config.base_laser, base)

    def copy_from_base(name: str, output_name: str | None = None) -> None:
        location = base.tensor(name)
        laser = None if base_laser is None else base_laser.target(name)
        unsharded.append((output_name or name, location.shape, (TensorPiece(location, laser=laser),), None))

    copy_from_base("model.embed_tokens.weight")
    for layer in range(shape.num_hidden_layers):
        for suffix in family.layer_tensors:
            copy_from_base(family.layer_name(layer, suffix))
        for tensor in layout.expert_tensors:
            groups = [range(len(experts))] if tensor.stacked else [[index] for index in range(len(experts))]
            for group in groups:
                pieces = tuple(
                    _expert_piece(experts[index], config, index, layer, part, seed, expert_lasers.get(index))
                    for index in group
                    for part in tensor.parts
                )
                rows = sum(piece.location.shape[0] for piece in pieces)
                columns = pieces[0].location.shape[1]
                tensor_shape = (len(experts), rows // len(experts), columns) if tensor.stacked else (rows, columns)
                unsharded.append((tensor.template.format(layer=layer, expert=group[0]), tensor_shape, pieces, None))
    copy_from_base("model.norm.weight")
    if not base.tie_word_embeddings:
        copy_from_base(family.untied_lm_head)
    for layer in range(shape.num_hidden_layers):
        unsharded.append((layout.router_name(layer), (len(experts), shape.hidden_size), (), layer))

    jobs: list[TensorJob] = []
    shard, shard_fill = 0, 0
    for name, tensor_shape, pieces, router_layer in unsharded:
        size = tensor_nbytes(dtype, tensor_shape)
        if shard_fill and shard_fill + size > shard_bytes:
            shard, shard_fill = shard + 1, 0
        shard_fill += size
        jobs.append(TensorJob(name, dtype, tensor_shape, shard, pieces, router_layer))

    total = sum(job.parameters for job in jobs)
    per_expert = shape.num_hidden_layers * 3 * shape.intermediate_size * shape.hidden_size
    active = total - (len(experts) - config.experts_per_token) * per_expert
    return MergePlan(
        config=config,
        base=base,
        experts=experts,
        layout=layout,
        dtype=dtype,
        jobs=tuple(jobs),
        shard_count=shard + 1,
        output_config=mixtral_config(base, config, SAFETENSORS_TO_CONFIG_DTYPE[dtype], len(experts)),
        tokenizer_files=tuple(base.path / name for name in TOKENIZER_FILES if (base.path / name).is_file()),
        total_parameters=total,
        active_parameters=active,
        laser_groups=(*expert_lasers.values(), *([base_laser] if base_laser else [])),
    )


def _expert_piece(
    expert: SourceModel,
    config: MergeConfig,
    index: int,
    layer: int,
    part: str,
    seed: int,
    laser: LaserGroup | None = None,
) -> TensorPiece:
    settings = config.experts[index]
    name = expert.family.mlp_name(layer, part)
    return TensorPiece(
        location=expert.tensor(name),
        noise_scale=settings.noise_scale,
        multiplier=settings.residual_scale if part == "down_proj" else None,
        noise_seed=zlib.crc32(f"{seed}:{index}:{name}".encode()),
        laser=None if laser is None else laser.target(name),
    )


def _base_dtype(base: SourceModel) -> str:
    declared = base.config.get("dtype") or base.config.get("torch_dtype")
    if declared in CONFIG_DTYPE_TO_SAFETENSORS:
        return str(declared)
    stored = base.tensor("model.embed_tokens.weight").dtype
    return SAFETENSORS_TO_CONFIG_DTYPE.get(stored, "float32")


def mixtral_config(base: SourceModel, config: MergeConfig, dtype_name: str, expert_count: int) -> dict[str, Any]:
    """A Mixtral config.json carrying every relevant field of the base model's config."""
    output: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    for key in MIXTRAL_CONFIG_FIELDS:
        if key in base.config:
            output[key] = base.config[key]
    output.update(
        num_key_value_heads=base.shape.num_key_value_heads,
        head_dim=base.shape.head_dim,
        hidden_act=base.shape.hidden_act,
        tie_word_embeddings=base.tie_word_embeddings,
        sliding_window=base.config.get("sliding_window"),
        num_local_experts=expert_count,
        num_experts_per_tok=config.experts_per_token,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        router_jitter_noise=0.0,
        torch_dtype=dtype_name,
        frankenmoe_version=__version__,
    )
    return output


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
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
            f"Shard size {text!r} is not a size. Use a byte count or a value like 5GB, 500MB, 2GiB."
        ) from None
    if value < 1:
        raise ConfigError(f"Shard size {text!r} must be at least one byte.")
    return int(value)
