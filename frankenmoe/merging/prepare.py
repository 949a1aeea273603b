"""Preparing a merge: the config read once, sources loaded and checked, OUT checked, the whole plan made and laser's ranks decided."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from frankenmoe.analysis.routing_check import RoutingCheck
from frankenmoe.analysis.verify import manifest_mismatch
from frankenmoe.architectures.tables import TOKENIZER_FILES
from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.checkpoint.output_folder import check_free_space, check_output_target
from frankenmoe.config.parse import parse_config, read_config_text
from frankenmoe.config.schema import MergeConfig
from frankenmoe.decoder.slices import cpu_multiplies_bfloat16
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import SAFETENSORS_TO_CONFIG_DTYPE
from frankenmoe.merging.downloads import planned_downloads, planned_streams
from frankenmoe.merging.laser_plan import LaserResult
from frankenmoe.merging.plan import DEFAULT_SHARD_BYTES, MergePlan
from frankenmoe.merging.planning import build_plan, decide_lasers
from frankenmoe.merging.timing import stage
from frankenmoe.merging.writer import NON_FINITE_CHECK
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.routers.request import GateRequest
from frankenmoe.sources.adapter import load_adapter, split_reference
from frankenmoe.sources.hub import Download, Stream, check_download_space, fetch
from frankenmoe.sources.model import SourceModel, check_compatible, load_source

if TYPE_CHECKING:  # gguf is slow to import: only a --format gguf merge loads it
    from frankenmoe.merging.gguf_plan import GgufPlan

logger = logging.getLogger("frankenmoe")


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge, with the CLI's defaults."""

    layout: str | None = None
    """None: the output architecture's first layout (classic)."""
    dtype: str | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    show_progress: bool = False
    check_routing: bool = True
    hash_sources: bool = False
    """Record each source weight file's full sha256 in the manifest (it reads every source byte once more)."""
    weight_cache_bytes: int = 0
    """Memory the hidden-state pass may spend keeping the base's matrices in float32 from one pass to
    the next (fit's text generation streams the whole base once per token). 0 keeps the streaming
    bound. It changes no byte of the output, so the manifest does not record it."""
    gguf_type: str | None = None
    """None: a safetensors checkpoint; a GGUF type name (q8_0, f16, ...): one GGUF file (gguf_output.py)."""
    stream_sources: bool = False
    """Read Hub sources' tensors over HTTP into the writer instead of downloading them (hub.planned_streams).
    It changes no byte of the output, so the manifest does not record it."""

    def recorded(self, plan: MergePlan) -> dict[str, Any]:
        """The options that change the output's bytes, resolved, as the manifest records them."""
        return {
            **self.requested(),
            "dtype": SAFETENSORS_TO_CONFIG_DTYPE[plan.dtype],
            "layout": plan.layout.name,
            "architecture": plan.architecture.model_type,
            "gate_mode": plan.config.gate_mode_description,
            # write.py refuses NaN/Inf only in what it computes: verify reports this (issue 23 item 6).
            **({} if self.gguf_type is not None else {"non_finite_check": NON_FINITE_CHECK}),
            # Only merges that generate text record it, so other build records stay up to date.
            **(
                {"generation_products": generation_products(resolve_device(self.device))}
                if plan.config.needs_prompts and plan.config.router.continuation_tokens
                else {}
            ),
        }

    def requested(self) -> dict[str, Any]:
        """The byte-changing options as given (before the plan resolves defaults)."""
        return {
            "seed": self.seed,
            "shard_bytes": self.shard_bytes,
            "device": self.device,
            "requested_dtype": self.dtype,
            "requested_layout": self.layout,
            # Only a GGUF output records its format, so existing safetensors build records stay up to date.
            **({} if self.gguf_type is None else {"format": f"gguf:{self.gguf_type}"}),
        }


@dataclass(frozen=True)
class PreparedMerge:
    """Everything decided before writing: the validated config, its text, the plan, where it goes, how."""

    config_text: str
    plan: MergePlan
    free_bytes: int
    out: Path
    options: MergeOptions
    config_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of the stages run while preparing: planning, then laser (its analysis, deciding the ranks)."""
    gguf: GgufPlan | None = None
    """Set when the output is a GGUF file: its tensors, types and tokenizer, decided before writing."""
    downloads: tuple[Download, ...] = ()
    """Files of Hub sources the merge reads that the Hugging Face cache does not hold yet (hub.py)."""
    streams: tuple[Stream, ...] = ()
    """With stream_sources: the Hub files the writer reads over HTTP instead (never stored)."""


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge made: OUT's files with sizes and hashes, the plan's figures, the checks."""

    out: Path
    architecture: str
    files: tuple[FileRecord, ...]
    total_parameters: int
    active_parameters: int
    timings: dict[str, float]
    """Seconds per stage: planning, laser, writing (routers included), verifying, routing_check, total."""
    routing_check: RoutingCheck | None
    laser_results: tuple[LaserResult, ...]
    manifest: dict[str, Any]

    @property
    def output_bytes(self) -> int:
        return sum(file.size for file in self.files)


@dataclass(frozen=True)
class LoadedConfig(MergeConfig):
    """A MergeConfig as `frankenmoe.load_config` returns it: with the YAML text it was parsed from (which the
    model card and manifest record) and the file it came from, so it can be handed on to a merge or build."""

    source_text: str = field(default="", repr=False, compare=False)
    source_path: Path | None = field(default=None, repr=False, compare=False)


ConfigInput = MergeConfig | Path | str | Mapping[str, Any]
"""A config file's path, YAML text, a mapping of the YAML's data, or what `load_config` returned."""


CONFIG_SUFFIXES = (".yaml", ".yml")


_YAML_MAPPING = re.compile(r":(\s|$)")
"""A `key: value` (or `key:` at the end): one line of YAML text rather than a file name."""


def read_config_input(config: ConfigInput) -> tuple[MergeConfig, str, Path | None]:
    """The validated config, its YAML text (for the model card and manifest) and its file, if any.

    A `str` naming an existing file is that file, and so is one that looks like a file name (one line,
    no `key: value`, ending in .yaml/.yml or holding a path separator): that one is reported as missing.
    Any other `str` is YAML text.
    """
    if isinstance(config, LoadedConfig):
        return _unchanged_since_loading(config), config.source_text, config.source_path
    if isinstance(config, MergeConfig):
        raise ConfigError(
            "This MergeConfig was not made by frankenmoe.load_config, so it carries no YAML text for the model "
            "card and manifest to record. Pass load_config's result, the config file's path, its YAML text or a dict."
        )
    if isinstance(config, Mapping):
        text = _yaml_text(config)
        return parse_config(text, "<dict config>"), text, None
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(
            f"A config of type {type(config).__name__} is not one frankenmoe reads. Pass a file's path, YAML text, "
            "a dict of the YAML's data or load_config's result."
        )
    path = Path(config) if not isinstance(config, str) or _names_a_file(config) else None
    if path is None:
        return parse_config(config, "<config text>"), config, None
    text = read_config_text(path)
    return parse_config(text, str(path)), text, path


def load_config_input(config: ConfigInput) -> LoadedConfig:
    """`read_config_input`'s config, carrying its text and file so that a merge or build can take it."""
    parsed, text, path = read_config_input(config)
    values = {item.name: getattr(parsed, item.name) for item in fields(MergeConfig)}
    return LoadedConfig(**values, source_text=text, source_path=path)


def _unchanged_since_loading(config: LoadedConfig) -> MergeConfig:
    # dataclasses.replace keeps the text of the config it copied: recording that text would misdescribe the output.
    parsed = parse_config(config.source_text, str(config.source_path or "<loaded config>"))
    if any(getattr(parsed, item.name) != getattr(config, item.name) for item in fields(MergeConfig)):
        raise ConfigError(
            "This config was changed after load_config read it (dataclasses.replace), so its YAML text, which the "
            "manifest records, no longer describes it. Change the YAML text or a dict of it and pass that instead."
        )
    return parsed


def _yaml_text(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_plain_data(config, ""), sort_keys=False)


def _plain_data(value: Any, where: str) -> Any:
    """`value` as data YAML can hold: mappings, lists, text, numbers, booleans; paths become their text."""
    if isinstance(value, Mapping):
        return {key: _plain_data(item, f"{where}.{key}".lstrip(".")) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(
        f"<dict config>: `{where}` is a {type(value).__name__}, which a config cannot hold. Use text, numbers, "
        "booleans, lists and dicts (a pathlib.Path is written as its text)."
    )


def _names_a_file(text: str) -> bool:
    if "\n" in text:
        return False
    try:
        if Path(text).expanduser().is_file():
            return True
    except (OSError, ValueError):  # a name too long or with a NUL byte is no file
        return False
    if _YAML_MAPPING.search(text):
        return False
    stripped = text.strip()
    return stripped.lower().endswith(CONFIG_SUFFIXES) or "/" in stripped or os.sep in stripped


def prepare_merge(config_input: ConfigInput, out: Path, options: MergeOptions) -> PreparedMerge:
    """Validate everything that can be validated without writing, plan every tensor, and decide laser's ranks.

    Laser's analysis is planning's last step and its longest (it reads the matrices the laser blocks
    consider), so it starts only once every check has passed. The plan returned is the one that runs.
    """
    timings: dict[str, float] = {}
    with stage("planning", timings):
        prepared = _checked_plan(config_input, Path(out), options)
    if not prepared.plan.laser_groups:
        # Every build record times the same stages; a merge without laser blocks logs no empty one.
        return replace(prepared, timings={**timings, "laser": 0.0})
    with stage("laser", timings):
        plan = decide_lasers(prepared.plan, resolve_device(options.device), options.show_progress)
    gguf = None if prepared.gguf is None else _with_plan_jobs(prepared.gguf, plan)
    return replace(prepared, plan=plan, gguf=gguf, timings=timings)


def _checked_plan(config_input: ConfigInput, out: Path, options: MergeOptions) -> PreparedMerge:
    """Every check and the plan of every tensor, laser's blocks still undecided; reads configs and headers only."""
    config, config_text, config_path = read_config_input(config_input)
    resolve_device(options.device)
    base, experts, shared_expert = load_sources(config)
    sources = [model.path for model in (base, *experts, shared_expert) if model is not None]
    check_output_target(out, sources, config_path, options.force, manifest_mismatch)
    plan = build_plan(
        config,
        base,
        experts,
        shared_expert=shared_expert,
        layout_name=options.layout,
        dtype_override=options.dtype,
        shard_bytes=options.shard_bytes,
        seed=options.seed,
    )
    if mismatch := plan.architecture.llama_cpp_mismatch(plan.output_config):
        logger.warning("%s This safetensors output is right for transformers and vLLM.", mismatch)
    if config.needs_prompts:
        load_tokenizer(base.path)  # fail now, not after the writer has copied every other tensor
    gguf = None
    if options.gguf_type is not None:
        from frankenmoe.merging.gguf_plan import plan_gguf

        gguf = plan_gguf(plan, options.gguf_type, out.name)
    free = check_free_space(out, plan.output_bytes if gguf is None else gguf.data_bytes)
    downloads = planned_downloads(plan, stream=options.stream_sources)
    streams = planned_streams(plan, downloads) if options.stream_sources else ()
    check_download_space(downloads, out, plan.output_bytes if gguf is None else gguf.data_bytes)
    return PreparedMerge(
        config_text, plan, free, out, options, config_path, gguf=gguf, downloads=downloads, streams=streams
    )


def _with_plan_jobs(gguf: GgufPlan, plan: MergePlan) -> GgufPlan:
    """The GGUF plan with its tensors' jobs taken from `plan`: the same jobs, with the ranks laser decided."""
    jobs = {job.name: job for job in plan.jobs}
    tensors = tuple(replace(tensor, jobs=tuple(jobs[job.name] for job in tensor.jobs)) for tensor in gguf.tensors)
    return replace(gguf, tensors=tensors)


def load_sources(config: MergeConfig) -> tuple[SourceModel, tuple[SourceModel, ...], SourceModel | None]:
    """Load the base, every expert and the shared expert (headers only) and check they can be merged.

    A `model+adapter` expert is its model's SourceModel carrying the adapter: experts that share a model
    and differ by adapter share its headers, read once, and their pieces read its tensors' bytes.
    """
    if split_reference(config.base_model)[1] is not None:
        raise ModelError(
            f"base_model {config.base_model!r} names a LoRA adapter (`model+adapter`), but the base model gives the "
            "MoE its attention, embeddings and norms unchanged, so it cannot carry one. Merge the adapter into the "
            "model with peft first, or give it to an expert (`source_model: model+adapter`)."
        )
    base = load_source(config.base_model)
    base.check_tensors()
    base.check_accounted()
    if base.hub is not None:
        # The merged model's tokenizer is the base's; only the base's tokenizer files are fetched (small).
        fetch(base.hub, [name for name in TOKENIZER_FILES if name in base.hub.files], show_progress=False)
    by_reference: dict[str, SourceModel] = {config.base_model: base}
    by_path: dict[Path, SourceModel] = {base.path: base}
    with_adapters: dict[str, SourceModel] = {}

    def load(reference: str, label: str, shared: bool = False) -> SourceModel:
        model_reference, adapter_reference = split_reference(reference)
        if model_reference not in by_reference:
            loaded = load_source(model_reference)  # a model named twice has its headers read once
            by_reference[model_reference] = by_path.setdefault(loaded.path, loaded)
        source = by_reference[model_reference]
        if source.family.mlp != base.family.mlp:
            raise ModelError(
                f"{label} ({reference}) is a {source.family.name} model whose MLP weights are not laid out like the "
                f"base model's ({base.family.name}); every expert must be a fine-tune of the same base architecture."
            )
        check_compatible(base, source, label, shared_expert=shared)
        source.check_tensors(source.mlp_tensor_names())
        source.check_accounted()
        if adapter_reference is None:
            return source
        if reference not in with_adapters:
            adapter = load_adapter(adapter_reference, source, label)
            with_adapters[reference] = replace(source, reference=reference, adapter=adapter)
        return with_adapters[reference]

    experts = tuple(load(expert.source_model, f"experts[{index}]") for index, expert in enumerate(config.experts))
    shared = tuple(
        load(expert.source_model, f"shared_experts[{index}]", shared=True)
        for index, expert in enumerate(config.shared_experts)
    )
    if all(expert.path == base.path and expert.adapter is None for expert in experts):
        logger.warning(
            "Every expert is the base model itself: the MoE will compute exactly what the base model does. "
            "That is useful for testing routers, but it adds no new knowledge."
        )
    return base, experts, shared[0] if shared else None


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was requested but no CUDA GPU is available here. Use --device cpu.")
        return torch.device(name)
    raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N for a specific GPU).")


def gate_request(plan: MergePlan, options: MergeOptions) -> GateRequest:
    """What the plan's gate mode needs to compute the routers."""
    device = resolve_device(options.device)
    return GateRequest(
        base=plan.base,
        experts=plan.config.experts,
        router=plan.config.router,
        expert_models=plan.experts,
        experts_per_token=plan.config.experts_per_token,
        renormalize=plan.architecture.routing.renormalizes(plan.output_config),
        shared_expert_slot=plan.architecture.shared_expert is not None,
        shared_expert=plan.config.shared_experts[0] if plan.config.shared_experts else None,
        shared_expert_model=plan.shared_expert,
        trunk=plan.trunk_merges,
        seed=options.seed,
        device=device,
        show_progress=options.show_progress,
        weight_cache_bytes=options.weight_cache_bytes,
        bfloat16_generation=generation_products(device) == "bfloat16",
    )


def generation_products(device: torch.device) -> str:
    """How text generation (router.continuation_tokens) multiplies the base's bfloat16 matrices here:
    "bfloat16" on a CPU with bfloat16 matrix units (decoder.slices.SliceCache), else "float32". The manifest
    records it, since greedy text and so the routers can differ between the two."""
    return "bfloat16" if device.type == "cpu" and cpu_multiplies_bfloat16() else "float32"
