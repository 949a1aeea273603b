"""Making the merge plan: every output tensor in write order, its pieces and shard, then laser's decisions.

`build_plan` reads only configs and safetensors headers, so every check that can fail on bad input
runs in it. `decide_lasers` is planning's last step: it reads the matrices the laser blocks consider
(one at a time) and sets the ranks to keep, so the plan a dry run shows is the one that runs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from frankenmoe.architectures.expected import active_parameters, expected_tensors
from frankenmoe.architectures.roles import EMBEDDINGS, FINAL_NORM, LM_HEAD, dims_shape
from frankenmoe.architectures.tables import TOKENIZER_FILES, OutputArchitecture, OutputLayout
from frankenmoe.config.schema import ExpertConfig, MergeConfig, SharedWeightsConfig
from frankenmoe.errors import ConfigError, InternalError, ModelError
from frankenmoe.io.safetensors import CONFIG_DTYPE_TO_SAFETENSORS, SAFETENSORS_TO_CONFIG_DTYPE, tensor_nbytes
from frankenmoe.merging.laser import analyse_lasers
from frankenmoe.merging.laser_plan import LaserGroup, LaserTarget, expert_laser_groups, kept_ranks, laser_group
from frankenmoe.merging.output_config import choose_architecture, choose_layout, output_config
from frankenmoe.merging.plan import DEFAULT_SHARD_BYTES, Computed, MergePlan, TensorJob, TensorPiece
from frankenmoe.sources.model import SourceModel
from frankenmoe.sources.trunk import TrunkMerge


@dataclass(frozen=True)
class _Tensor:
    """An output tensor before it is given a shard."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[TensorPiece, ...] = ()
    computed: Computed | None = None
    merged: TrunkMerge | None = None


@dataclass(frozen=True)
class _Sources:
    """What every output tensor is planned from."""

    config: MergeConfig
    base: SourceModel
    experts: tuple[SourceModel, ...]
    shared_expert: SourceModel | None
    arch: OutputArchitecture
    layout: OutputLayout
    seed: int
    expert_lasers: dict[int, LaserGroup]
    base_laser: LaserGroup | None


def build_plan(
    config: MergeConfig,
    base: SourceModel,
    experts: tuple[SourceModel, ...],
    *,
    shared_expert: SourceModel | None = None,
    layout_name: str | None = None,
    dtype_override: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
) -> MergePlan:
    """Decide every output tensor and its shard; reads nothing but the sources' indexes.

    Laser blocks' matrices are chosen here, undecided: `decide_lasers` completes the plan.
    """
    arch, reason = choose_architecture(config.architecture, base, experts, len(config.shared_experts))
    layout = choose_layout(arch, layout_name)
    dtype = CONFIG_DTYPE_TO_SAFETENSORS[dtype_override or config.dtype or _base_dtype(base)]
    expert_lasers = expert_laser_groups(config, experts)
    base_laser = None if config.base_laser is None else laser_group("base_laser", config.base_laser, base)
    sources = _Sources(config, base, experts, shared_expert, arch, layout, seed, expert_lasers, base_laser)
    jobs = _assign_shards(tuple(_output_tensors(sources)), dtype, shard_bytes)
    total = sum(job.parameters for job in jobs)
    config_json = output_config(arch, base, config, SAFETENSORS_TO_CONFIG_DTYPE[dtype], len(experts), shared_expert)
    _check_planned_tensors(jobs, arch, layout, config_json)
    return MergePlan(
        config=config,
        base=base,
        experts=experts,
        architecture=arch,
        architecture_reason=reason,
        layout=layout,
        dtype=dtype,
        jobs=jobs,
        shard_count=jobs[-1].shard + 1,
        output_config=config_json,
        tokenizer_files=tuple(base.path / name for name in TOKENIZER_FILES if (base.path / name).is_file()),
        total_parameters=total,
        active_parameters=active_parameters(total, _expert_parameters(base), len(experts), config.experts_per_token),
        shared_expert=shared_expert,
        skipped_tensors=base.skipped_tensors(),
        laser_groups=(*expert_lasers.values(), *([base_laser] if base_laser else [])),
    )


def _check_planned_tensors(
    jobs: tuple[TensorJob, ...], arch: OutputArchitecture, layout: OutputLayout, config_json: dict[str, Any]
) -> None:
    """The plan's tensors are exactly those its config.json implies: `expected_tensors` owns that set, and
    `verify` checks every output against it, so a plan that disagreed would write an output verify rejects."""
    planned = {job.name: job.shape for job in jobs}
    implied = expected_tensors(arch, layout, config_json)
    if planned != implied:
        differing = sorted(name for name in planned.keys() | implied.keys() if planned.get(name) != implied.get(name))
        raise InternalError(
            f"The plan's tensors differ from those its config.json implies ({', '.join(differing[:5])}): a bug in "
            "frankenmoe's tables. Please report it with the config."
        )


def decide_lasers(plan: MergePlan, device: torch.device, show_progress: bool = False) -> MergePlan:
    """The plan with laser's decisions: each considered matrix measured (and checked against its block's
    calibration text), the rank to keep set on every piece the analysis reduces, and every result kept
    for the dry run, the model card and MergeResult. Reads the considered matrices, one at a time."""
    results = analyse_lasers(plan.laser_groups, plan.base, device, show_progress)
    ranks = kept_ranks(results)

    def decided(target: LaserTarget | None) -> LaserTarget | None:
        rank = None if target is None else ranks.get((target.group, target.layer, target.matrix))
        return target if rank is None else replace(target, keep_rank=rank)

    jobs = tuple(
        replace(job, pieces=tuple(replace(piece, laser=decided(piece.laser)) for piece in job.pieces))
        for job in plan.jobs
    )
    return replace(plan, jobs=jobs, laser_results=results)


def _output_tensors(sources: _Sources) -> Iterator[_Tensor]:
    """Every output tensor in write order; the computed ones come last, so the writer copies the rest while
    their rows are still being computed."""
    layers = range(sources.base.shape.num_hidden_layers)
    yield _from_base(sources, EMBEDDINGS.name)
    for layer in layers:
        yield from _attention_and_norms(sources, layer)
        yield from _routed_experts(sources, layer)
        yield from _shared_expert(sources, layer)
    yield _from_base(sources, FINAL_NORM.name)
    if not sources.base.tie_word_embeddings:
        yield _from_base(sources, LM_HEAD.name)
    elif sources.arch.explicit_head:
        yield _from_base(sources, EMBEDDINGS.name, LM_HEAD.name)  # what the tied head computes, as its own matrix
    hidden = sources.base.shape.hidden_size
    for layer in layers:
        router = (len(sources.experts), hidden)
        yield _Tensor(sources.layout.router_name(layer), router, computed=Computed("router", layer))
        if sources.arch.shared_expert is not None:
            gate = sources.arch.shared_expert.gate.format(layer=layer)
            yield _Tensor(gate, (1, hidden), computed=Computed("shared_expert_gate", layer))


def _from_base(sources: _Sources, name: str, output_name: str | None = None) -> _Tensor:
    """A shared tensor: the base's (with its laser target), or merged from the base and the experts."""
    location = sources.base.tensor(name)
    trunk = sources.config.shared_weights
    if trunk.method != "base":
        merged = trunk_merge(trunk, name, sources.base, sources.experts, sources.seed)
        return _Tensor(output_name or name, location.shape, merged=merged)
    laser = None if sources.base_laser is None else sources.base_laser.target(name)
    return _Tensor(output_name or name, location.shape, (TensorPiece(location, laser=laser),))


def _attention_and_norms(sources: _Sources, layer: int) -> Iterator[_Tensor]:
    base = sources.base
    for weight in sources.arch.layer_weights:
        name = base.family.layer_name(layer, weight.name)
        if name in base.tensors:
            yield _from_base(sources, name)
        elif weight.name in sources.arch.zero_filled:
            yield _Tensor(name, dims_shape(weight.shape, base.shape.dims()))
        else:
            base.tensor(name)  # raises, naming the missing tensor


def _routed_experts(sources: _Sources, layer: int) -> Iterator[_Tensor]:
    """The layer's experts' MLPs: one tensor per expert and part, or all experts stacked (fused layouts)."""
    experts, config = sources.experts, sources.config
    for tensor in sources.layout.expert_tensors:
        groups = [range(len(experts))] if tensor.stacked else [[index] for index in range(len(experts))]
        for group in groups:
            pieces = tuple(
                _mlp_piece(
                    experts[index],
                    config.experts[index],
                    layer,
                    part,
                    sources.seed,
                    str(index),
                    sources.expert_lasers.get(index),
                )
                for index in group
                for part in tensor.parts
            )
            rows = sum(piece.location.shape[0] for piece in pieces)
            columns = pieces[0].location.shape[1]
            shape = (len(experts), rows // len(experts), columns) if tensor.stacked else (rows, columns)
            yield _Tensor(tensor.template.format(layer=layer, expert=group[0]), shape, pieces)


def _shared_expert(sources: _Sources, layer: int) -> Iterator[_Tensor]:
    """The layer's shared-expert slot, if the output has one: the shared expert's MLP, or one all-zero row."""
    if sources.arch.shared_expert is None:
        return
    hidden = sources.base.shape.hidden_size
    for part, template in sources.arch.shared_expert.mlp.items():
        name = template.format(layer=layer)
        if sources.shared_expert is None:
            yield _Tensor(name, (1, hidden) if part != "down_proj" else (hidden, 1))
        else:
            settings = sources.config.shared_experts[0]
            piece = _mlp_piece(sources.shared_expert, settings, layer, part, sources.seed, "shared")
            yield _Tensor(name, piece.location.shape, (piece,))


def _assign_shards(tensors: tuple[_Tensor, ...], dtype: str, shard_bytes: int) -> tuple[TensorJob, ...]:
    """The tensors as jobs, in order, a new shard starting where the next tensor would overflow this one."""
    jobs: list[TensorJob] = []
    shard, shard_fill = 0, 0
    for tensor in tensors:
        size = tensor_nbytes(dtype, tensor.shape)
        if shard_fill and shard_fill + size > shard_bytes:
            shard, shard_fill = shard + 1, 0
        shard_fill += size
        jobs.append(TensorJob(tensor.name, dtype, tensor.shape, shard, tensor.pieces, tensor.computed, tensor.merged))
    return tuple(jobs)


def _expert_parameters(base: SourceModel) -> int:
    """Parameters of one expert's MLPs over every layer (the active count leaves out the unrouted ones)."""
    shape = base.shape
    return shape.num_hidden_layers * 3 * shape.intermediate_size * shape.hidden_size


def trunk_merge(
    trunk: SharedWeightsConfig, name: str, base: SourceModel, experts: tuple[SourceModel, ...], seed: int
) -> TrunkMerge:
    """How shared tensor `name` is made from the base and every expert; refuses sources whose tensor differs in shape."""
    location = base.tensor(name)
    sources = []
    for index, expert in enumerate(experts):
        if name not in expert.tensors:
            raise ModelError(
                f"shared_weights.method {trunk.method} merges {name!r} from every expert, but expert {index} "
                f"({expert.reference}) has no such tensor. Use `shared_weights.method: base` for these experts."
            )
        other = expert.tensors[name]
        if other.shape != location.shape:
            raise ModelError(
                f"shared_weights.method {trunk.method} cannot merge {name!r}: it is {list(other.shape)} in expert "
                f"{index} ({expert.reference}) but {list(location.shape)} in the base model. Shared tensors can be "
                "merged only between models of the same shape (an expert with added tokens has a larger "
                "embedding); use `shared_weights.method: base`."
            )
        sources.append(other)
    return TrunkMerge(
        method=trunk.method,
        base=location,
        sources=tuple(sources),
        weights=trunk.weights or (1.0,) * len(experts),
        base_weight=trunk.base_weight,
        density=trunk.density,
        scale=trunk.scale,
        normalize=trunk.normalize,
        seed=zlib.crc32(f"{seed}:trunk:{name}".encode()),
    )


def _mlp_piece(
    source: SourceModel,
    settings: ExpertConfig,
    layer: int,
    part: str,
    seed: int,
    noise_key: str,
    laser: LaserGroup | None = None,
) -> TensorPiece:
    """One MLP matrix of an expert (routed or shared) with its LoRA delta, residual_scale, noise and laser."""
    name = source.family.mlp_name(layer, part)
    lora = source.lora_delta(name)
    target = None if laser is None else laser.target(name)
    if lora is not None and target is not None:
        # Laser's analysis measures (and its calibration runs) the model's own matrices, not W + scale * B @ A.
        raise ConfigError(
            f"`{target.group}` considers {name} of {source.reference}, which its LoRA adapter changes; laser "
            "analyses a model's matrices without the adapter, so its ranks would not fit the merged matrix. Remove "
            "the laser block, or merge the adapter into its model with peft first and laser that model."
        )
    return TensorPiece(
        location=source.tensor(name),
        noise_scale=settings.noise_scale,
        multiplier=settings.residual_scale if part == "down_proj" else None,
        noise_seed=zlib.crc32(f"{seed}:{noise_key}:{name}".encode()),
        laser=target,
        lora=lora,
    )


def _base_dtype(base: SourceModel) -> str:
    declared = base.config.get("dtype") or base.config.get("torch_dtype")
    if declared in CONFIG_DTYPE_TO_SAFETENSORS:
        return str(declared)
    stored = base.tensor(EMBEDDINGS.name).dtype
    return SAFETENSORS_TO_CONFIG_DTYPE.get(stored, "float32")
