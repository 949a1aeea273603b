"""The merge, start to finish: config -> sources -> checks -> plan -> routers -> staged write."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from frankenmoe.card import model_card
from frankenmoe.config import MergeConfig, load_config
from frankenmoe.errors import ConfigError
from frankenmoe.output import check_free_space, check_output_target, staged_output
from frankenmoe.plan import DEFAULT_SHARD_BYTES, MergePlan, build_plan
from frankenmoe.routers import GateRequest, compute_gates
from frankenmoe.sources import SourceModel, check_compatible, load_source
from frankenmoe.write import verify_checkpoint, write_checkpoint

logger = logging.getLogger("frankenmoe")


@dataclass(frozen=True)
class MergeOptions:
    layout: str = "classic"
    dtype: str | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    show_progress: bool = False


@dataclass(frozen=True)
class PreparedMerge:
    """Everything decided before writing: the validated config, its text, the plan, free space."""

    config_text: str
    plan: MergePlan
    free_bytes: int


def prepare_merge(config_path: Path, out: Path, options: MergeOptions) -> PreparedMerge:
    """Validate everything that can be validated without writing, and plan every tensor."""
    config = load_config(config_path)
    resolve_device(options.device)
    base, experts = load_sources(config)
    check_output_target(out, [base.path, *(expert.path for expert in experts)], options.force)
    plan = build_plan(
        config,
        base,
        experts,
        layout_name=options.layout,
        dtype_override=options.dtype,
        shard_bytes=options.shard_bytes,
        seed=options.seed,
    )
    free = check_free_space(out, plan.output_bytes)
    return PreparedMerge(config_path.read_text(encoding="utf-8"), plan, free)


def load_sources(config: MergeConfig) -> tuple[SourceModel, tuple[SourceModel, ...]]:
    """Load the base and every expert (headers only) and check they can be merged."""
    base = load_source(config.base_model)
    base.check_tensors()
    loaded: dict[Path, SourceModel] = {base.path: base}
    experts = []
    for index, expert_config in enumerate(config.experts):
        expert = load_source(expert_config.source_model)
        expert = loaded.setdefault(expert.path, expert)
        check_compatible(base, expert, f"experts[{index}]")
        expert.check_tensors(expert.mlp_tensor_names())
        experts.append(expert)
    if all(expert.path == base.path for expert in experts):
        logger.warning(
            "Every expert is the base model itself: the MoE will compute exactly what the base model does. "
            "That is useful for testing routers, but it adds no new knowledge."
        )
    return base, tuple(experts)


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was requested but no CUDA GPU is available here. Use --device cpu.")
        return torch.device(name)
    raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N for a specific GPU).")


def execute_merge(prepared: PreparedMerge, out: Path, options: MergeOptions) -> None:
    """Compute the routers, write the checkpoint into a staging folder, verify it, move it to OUT."""
    plan = prepared.plan
    request = GateRequest(
        base=plan.base,
        experts=plan.config.experts,
        router=plan.config.router,
        seed=options.seed,
        device=resolve_device(options.device),
        show_progress=options.show_progress,
    )
    gates = compute_gates(plan.config.gate_mode, request)
    card = model_card(plan, prepared.config_text)
    with staged_output(out) as staging:
        write_checkpoint(plan, gates, staging, card, options.show_progress)
        verify_checkpoint(plan, staging)
