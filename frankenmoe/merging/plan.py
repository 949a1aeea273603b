"""The merge plan: every output tensor, where its bytes come from, its shape, dtype and shard.

Building a plan reads only configs and safetensors headers, so every check that can fail on bad
input runs here, before a byte is written. The plan is a pure value; `write.py` executes it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from frankenmoe import __version__
from frankenmoe.architectures.tables import (
    EMBEDDINGS,
    FINAL_NORM,
    LM_HEAD,
    OUTPUT_ARCHITECTURES,
    TOKENIZER_FILES,
    OutputArchitecture,
    OutputLayout,
    attention_projection_name,
)
from frankenmoe.config.schema import ExpertConfig, LaserConfig, MergeConfig, SharedWeightsConfig
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import (
    CONFIG_DTYPE_TO_SAFETENSORS,
    SAFETENSORS_TO_CONFIG_DTYPE,
    TensorLocation,
    tensor_nbytes,
)
from frankenmoe.routers.request import NEUTRAL_GATE
from frankenmoe.sources.lora import LoraDelta
from frankenmoe.sources.model import SourceModel, dims_shape
from frankenmoe.sources.trunk import TrunkMerge

DEFAULT_SHARD_BYTES = 5 * 10**9
EMPTY_SHARED_EXPERT_SIZE = 1
"""An output with a shared-expert slot but no shared expert gets one all-zero row there: it adds exactly
nothing. Size 0 loads in transformers, but llama.cpp reads a shared size of 0 as "the experts' size"."""


@dataclass(frozen=True)
class LaserTarget:
    """Marks a piece as considered by a laser block; `keep_rank` is set once the analysis reduces it."""

    group: str
    layer: int
    matrix: str
    keep_rank: int | None = None

    @property
    def reduces(self) -> bool:
        return self.keep_rank is not None


@dataclass(frozen=True)
class LaserMatrix:
    layer: int
    matrix: str
    location: TensorLocation
    layer_prefix: str

    @property
    def name_in_layer(self) -> str:
        """The weight's name inside its decoder layer, as StreamedDecoder.forward_layer's overrides expect."""
        return self.location.name.removeprefix(self.layer_prefix)


@dataclass(frozen=True)
class LaserGroup:
    """One `laser` block: its config path, settings, the model it reads and every matrix it considers."""

    path: str
    settings: LaserConfig
    source: SourceModel
    matrices: tuple[LaserMatrix, ...]

    def target(self, tensor_name: str) -> LaserTarget | None:
        for matrix in self.matrices:
            if matrix.location.name == tensor_name:
                return LaserTarget(self.path, matrix.layer, matrix.matrix)
        return None


def laser_group(path: str, settings: LaserConfig, source: SourceModel) -> LaserGroup:
    """The matrices a laser block considers in `source`; layer indices are checked here."""
    layers = resolve_layers(settings.layers, source.shape.num_hidden_layers, f"{path}.layers", source)
    if settings.calibration is not None and not Path(settings.calibration).expanduser().is_file():
        raise ConfigError(
            f"`{path}.calibration` names {settings.calibration!r}, which is not a file "
            f"(looked for {Path(settings.calibration).expanduser().resolve()}). Point it at a plain-text file, "
            "or remove the key to apply every selected reduction unchecked."
        )
    matrices = tuple(
        LaserMatrix(
            layer,
            matrix,
            source.tensor(matrix_tensor_name(source, layer, matrix)),
            source.family.layer_name(layer, ""),
        )
        for layer in layers
        for matrix in settings.matrices
    )
    return LaserGroup(path, settings, source, matrices)


def resolve_layers(spec: str | tuple[int, ...], layer_count: int, path: str, source: SourceModel) -> tuple[int, ...]:
    if spec == "all":
        return tuple(range(layer_count))
    if spec == "last_half":
        return tuple(range(layer_count // 2, layer_count))
    outside = [layer for layer in spec if layer >= layer_count]
    if outside:
        raise ConfigError(
            f"`{path}` selects layer {outside[0]}, but model {source.reference} has {layer_count} layers "
            f"(indices 0-{layer_count - 1}). Use indices in that range, `all` or `last_half`."
        )
    return tuple(spec)


def matrix_tensor_name(source: SourceModel, layer: int, matrix: str) -> str:
    if matrix in source.family.mlp:
        return source.family.mlp_name(layer, matrix)
    return source.family.layer_name(layer, attention_projection_name(matrix))


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

    def with_laser_ranks(self, ranks: dict[tuple[str, int, str], int]) -> MergePlan:
        """This plan with the ranks laser's analysis chose, (block path, layer, matrix) -> rank to keep."""

        def decided(target: LaserTarget | None) -> LaserTarget | None:
            rank = None if target is None else ranks.get((target.group, target.layer, target.matrix))
            return target if rank is None else replace(target, keep_rank=rank)

        jobs = tuple(
            replace(job, pieces=tuple(replace(piece, laser=decided(piece.laser)) for piece in job.pieces))
            for job in self.jobs
        )
        return replace(self, jobs=jobs)

    def shared_weights_origin(self) -> str:
        """How the non-expert tensors (attention, norms, embeddings, head) were made, in one line."""
        merges = self.trunk_merges
        if not merges:
            return f"copied from the base model {self.base.reference}"
        return (
            f"every one of {len(merges)} merged from the base and the experts, {next(iter(merges.values())).describe()}"
        )

    def computed_origin(self, kind: str) -> str:
        """How a computed tensor's rows are made, for the dry run and the model card."""
        mode = self.config.gate_mode
        if kind == "router":
            return f"gate mode {mode} from the experts' prompts" if self.config.needs_prompts else f"gate mode {mode}"
        shared = self.config.shared_experts[0] if self.config.shared_experts else None
        if shared is None:
            return (
                f"neutral ({NEUTRAL_GATE} everywhere; no shared expert: its slot is one all-zero row, adding nothing)"
            )
        if not self.config.needs_prompts:
            return (
                f"neutral ({NEUTRAL_GATE} everywhere: gate mode {mode} uses no prompts; sigmoid = 0.5 on every token)"
            )
        if not shared.positive_prompts:
            return f"neutral ({NEUTRAL_GATE} everywhere: the shared expert has no positive_prompts; sigmoid = 0.5 on every token)"
        return f"gate mode {mode} from the shared expert's prompts, as one more expert, scaled like the routers"


def choose_architecture(
    requested: str, base: SourceModel, experts: tuple[SourceModel, ...], shared_count: int
) -> tuple[OutputArchitecture, str]:
    """The output architecture for these sources, and why; refuses one that cannot hold them.

    `auto` takes the base family's natural output when it can hold every source, else the first
    output in the table that can.
    """
    if requested != "auto":
        arch = OUTPUT_ARCHITECTURES[requested]
        problem = _why_not(arch, base, experts, shared_count)
        if problem is None:
            return arch, "set in the config"
        fitting = [
            name
            for name, candidate in OUTPUT_ARCHITECTURES.items()
            if not _why_not(candidate, base, experts, shared_count)
        ]
        instead = f" Use `architecture: {fitting[0]}` (or `auto`)." if fitting else ""
        raise ConfigError(f"`architecture: {requested}` cannot hold these sources: {problem}.{instead}")
    natural = OUTPUT_ARCHITECTURES[base.family.natural_output]
    problem = _why_not(natural, base, experts, shared_count)
    if problem is None:
        return natural, f"auto: the natural output for {base.family.name} sources"
    for arch in OUTPUT_ARCHITECTURES.values():
        if _why_not(arch, base, experts, shared_count) is None:
            return arch, f"auto: {natural.model_type} cannot hold these sources ({problem})"
    raise ConfigError(f"No output architecture can hold these sources: {natural.model_type}: {problem}.")


def _why_not(
    arch: OutputArchitecture, base: SourceModel, experts: tuple[SourceModel, ...], shared_count: int
) -> str | None:
    # Only the base's attention, norms and embeddings enter the output; experts give their MLPs alone.
    family = base.family.name
    if family in arch.refuses:
        return f"the base model ({base.reference}) is a {family} model: {arch.refuses[family]}"
    if family not in arch.accepts:
        return f"the base model ({base.reference}) is a {family} model, which {arch.model_type} does not take"
    lost = sorted(weight.name for weight in base.layer_weights() if weight.name not in arch.layer_slot_names())
    if lost:
        return (
            f"the base model's {', '.join(lost)} (every layer) would be lost: {arch.model_type}'s attention has no "
            "place for them"
        )
    if shared_count and arch.shared_expert is None:
        return f"the config has a shared expert, which {arch.model_type} has no slot for"
    if arch.shared_expert is not None and shared_count > arch.shared_expert.max_count:
        return (
            f"the config has {shared_count} shared experts, but {arch.model_type} has "
            f"{arch.shared_expert.max_count} shared-expert slot per layer; keep one"
        )
    return None


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
    """Decide every output tensor and its shard; reads nothing but the sources' indexes."""
    arch, reason = choose_architecture(config.architecture, base, experts, len(config.shared_experts))
    layout = _layout(arch, layout_name)
    dtype = CONFIG_DTYPE_TO_SAFETENSORS[dtype_override or config.dtype or _base_dtype(base)]
    shape = base.shape
    family = base.family
    dims = shape.dims()
    unsharded: list[tuple[str, tuple[int, ...], tuple[TensorPiece, ...], Computed | None, TrunkMerge | None]] = []
    trunk = config.shared_weights
    expert_lasers = {
        index: laser_group(f"experts[{index}].laser", settings.laser, experts[index])
        for index, settings in enumerate(config.experts)
        if settings.laser is not None
    }
    base_laser = None if config.base_laser is None else laser_group("base_laser", config.base_laser, base)

    def copy_from_base(name: str, output_name: str | None = None) -> None:
        location = base.tensor(name)
        output_name = output_name or name
        if trunk.method != "base":
            unsharded.append((output_name, location.shape, (), None, trunk_merge(trunk, name, base, experts, seed)))
            return
        laser = None if base_laser is None else base_laser.target(name)
        unsharded.append((output_name, location.shape, (TensorPiece(location, laser=laser),), None, None))

    copy_from_base(EMBEDDINGS.name)
    for layer in range(shape.num_hidden_layers):
        for weight in arch.layer_weights:
            name = family.layer_name(layer, weight.name)
            if name in base.tensors:
                copy_from_base(name)
            elif weight.name in arch.zero_filled:
                unsharded.append((name, dims_shape(weight.shape, dims), (), None, None))
            else:
                base.tensor(name)  # raises, naming the missing tensor
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
                unsharded.append(
                    (tensor.template.format(layer=layer, expert=group[0]), tensor_shape, pieces, None, None)
                )
        if arch.shared_expert is not None:
            for part, template in arch.shared_expert.mlp.items():
                name = template.format(layer=layer)
                if shared_expert is None:
                    empty = (1, shape.hidden_size) if part != "down_proj" else (shape.hidden_size, 1)
                    unsharded.append((name, empty, (), None, None))
                else:
                    piece = _mlp_piece(shared_expert, config.shared_experts[0], layer, part, seed, "shared")
                    unsharded.append((name, piece.location.shape, (piece,), None, None))
    copy_from_base(FINAL_NORM.name)
    if not base.tie_word_embeddings:
        copy_from_base(LM_HEAD.name)
    elif arch.explicit_head:
        copy_from_base(EMBEDDINGS.name, LM_HEAD.name)  # what the tied head computes, as its own matrix
    for layer in range(shape.num_hidden_layers):
        unsharded.append(
            (layout.router_name(layer), (len(experts), shape.hidden_size), (), Computed("router", layer), None)
        )
        if arch.shared_expert is not None:
            gate_name = arch.shared_expert.gate.format(layer=layer)
            unsharded.append((gate_name, (1, shape.hidden_size), (), Computed("shared_expert_gate", layer), None))

    jobs: list[TensorJob] = []
    shard, shard_fill = 0, 0
    for name, tensor_shape, pieces, computed, merged in unsharded:
        size = tensor_nbytes(dtype, tensor_shape)
        if shard_fill and shard_fill + size > shard_bytes:
            shard, shard_fill = shard + 1, 0
        shard_fill += size
        jobs.append(TensorJob(name, dtype, tensor_shape, shard, pieces, computed, merged))

    total = sum(job.parameters for job in jobs)
    per_expert = shape.num_hidden_layers * 3 * shape.intermediate_size * shape.hidden_size
    active = total - (len(experts) - config.experts_per_token) * per_expert
    return MergePlan(
        config=config,
        base=base,
        experts=experts,
        architecture=arch,
        architecture_reason=reason,
        layout=layout,
        dtype=dtype,
        jobs=tuple(jobs),
        shard_count=shard + 1,
        output_config=output_config(
            arch, base, config, SAFETENSORS_TO_CONFIG_DTYPE[dtype], len(experts), shared_expert
        ),
        tokenizer_files=tuple(base.path / name for name in TOKENIZER_FILES if (base.path / name).is_file()),
        total_parameters=total,
        active_parameters=active,
        shared_expert=shared_expert,
        skipped_tensors=base.skipped_tensors(),
        laser_groups=(*expert_lasers.values(), *([base_laser] if base_laser else [])),
    )


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


def _layout(arch: OutputArchitecture, layout_name: str | None) -> OutputLayout:
    if layout_name is None:
        return arch.layouts[arch.default_layout]
    if layout_name not in arch.layouts:
        raise ConfigError(
            f"--layout {layout_name} is not a tensor layout of {arch.model_type}; it has: {', '.join(arch.layouts)}."
        )
    return arch.layouts[layout_name]


def _expert_piece(
    expert: SourceModel,
    config: MergeConfig,
    index: int,
    layer: int,
    part: str,
    seed: int,
    laser: LaserGroup | None = None,
) -> TensorPiece:
    return _mlp_piece(expert, config.experts[index], layer, part, seed, str(index), laser)


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


def rope_fields(base_config: dict[str, Any]) -> dict[str, Any]:
    """The base model's rope settings in both spellings readers use, derived from one resolved value.

    transformers 5 writes only `rope_parameters`; transformers 4.x, vLLM and other readers look for
    `rope_theta` / `rope_scaling` and silently fall back to a default theta when they are missing.
    transformers resolves what the base config means (its family's default theta included).
    """
    from transformers import AutoConfig

    resolved = AutoConfig.for_model(**base_config)
    parameters = dict(getattr(resolved, "rope_parameters", None) or {})
    theta = parameters.get("rope_theta", getattr(resolved, "rope_theta", None))
    if theta is None:
        raise ModelError(
            f"The base model's config.json gives no rope theta that transformers can resolve ({parameters})."
        )
    parameters = {"rope_type": "default", **parameters, "rope_theta": theta}
    scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    return {
        "rope_theta": theta,
        "rope_scaling": None if scaling.get("rope_type") == "default" and len(scaling) == 1 else scaling,
        "rope_parameters": parameters,
    }


def output_config(
    arch: OutputArchitecture,
    base: SourceModel,
    config: MergeConfig,
    dtype_name: str,
    expert_count: int,
    shared_expert: SourceModel | None = None,
) -> dict[str, Any]:
    """The output's config.json: the base's carried fields, rope in both spellings, and the MoE's own fields."""
    output: dict[str, Any] = {"architectures": [arch.class_name], "model_type": arch.model_type}
    for key in arch.carried_fields:
        if key in base.config:
            output[key] = base.config[key]
    for key, default in arch.carried_defaults.items():
        output[key] = base.config.get(key, default)
    output.update(rope_fields(base.config))
    output.update(arch.fixed_fields)
    output.update(
        num_key_value_heads=base.shape.num_key_value_heads,
        head_dim=base.shape.head_dim,
        hidden_act=base.shape.hidden_act,
        tie_word_embeddings=base.tie_word_embeddings and not arch.explicit_head,
        intermediate_size=base.shape.intermediate_size,
        num_experts_per_tok=config.experts_per_token,
        torch_dtype=dtype_name,
        frankenmoe_version=__version__,
    )
    output[arch.expert_count_key] = expert_count
    output[arch.expert_size_key] = base.shape.intermediate_size
    if arch.shared_expert is not None:
        output[arch.shared_expert.size_key] = (
            EMPTY_SHARED_EXPERT_SIZE if shared_expert is None else shared_expert.shape.intermediate_size
        )
    return output


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
