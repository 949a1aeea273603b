"""The merge, start to finish: config -> sources -> checks -> plan -> routers -> staged write."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

import torch

from frankenmoe.card import laser_sections, model_card
from frankenmoe.config import MergeConfig, load_config
from frankenmoe.errors import ConfigError
from frankenmoe.laser import run_laser
from frankenmoe.output import check_complete, check_free_space, check_output_target, staged_output
from frankenmoe.plan import DEFAULT_SHARD_BYTES, MergePlan, build_plan
from frankenmoe.routers import GateRequest, compute_gates
from frankenmoe.routers.prompts import load_tokenizer
from frankenmoe.routing import RoutingCheck, check_positive_prompts, routing_check_markdown
from frankenmoe.sources import SourceModel, check_compatible, load_source
from frankenmoe.write import INDEX_NAME, verify_checkpoint, write_checkpoint

logger = logging.getLogger("frankenmoe")
T = TypeVar("T")


@dataclass(frozen=True)
class MergeOptions:
    layout: str | None = None
    """None: the output architecture's first layout (classic)."""
    dtype: str | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    show_progress: bool = False
    check_routing: bool = True


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
    base, experts, shared_expert = load_sources(config)
    check_output_target(out, [base.path, *(expert.path for expert in experts)], options.force)
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
    if config.needs_prompts:
        load_tokenizer(base.path)  # fail now, not after the writer has copied every other tensor
    free = check_free_space(out, plan.output_bytes)
    return PreparedMerge(config_path.read_text(encoding="utf-8"), plan, free)


def load_sources(config: MergeConfig) -> tuple[SourceModel, tuple[SourceModel, ...], SourceModel | None]:
    """Load the base, every expert and the shared expert (headers only) and check they can be merged."""
    base = load_source(config.base_model)
    base.check_tensors()
    base.check_accounted()
    by_reference: dict[str, SourceModel] = {config.base_model: base}
    by_path: dict[Path, SourceModel] = {base.path: base}

    def load(reference: str, label: str, shared: bool = False) -> SourceModel:
        if reference not in by_reference:
            loaded = load_source(reference)  # a model named twice has its headers read once
            by_reference[reference] = by_path.setdefault(loaded.path, loaded)
        source = by_reference[reference]
        check_compatible(base, source, label, shared_expert=shared)
        source.check_tensors(source.mlp_tensor_names())
        source.check_accounted()
        return source

    experts = tuple(load(expert.source_model, f"experts[{index}]") for index, expert in enumerate(config.experts))
    shared = tuple(
        load(expert.source_model, f"shared_experts[{index}]", shared=True)
        for index, expert in enumerate(config.shared_experts)
    )
    if all(expert.path == base.path for expert in experts):
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
        seed=options.seed,
        device=resolve_device(options.device),
        show_progress=options.show_progress,
    )


def execute_merge(prepared: PreparedMerge, out: Path, options: MergeOptions) -> RoutingCheck | None:
    """Compute the routers, write the checkpoint into a staging folder, verify it, move it to OUT.

    Unless `options.check_routing` is off, the experts' positive prompts are routed through the staged
    checkpoint and the result is added to its model card and returned (None when it did not run).
    """
    plan = prepared.plan
    request = gate_request(plan, options)
    plan, laser_results = run_laser(plan, request.device, options.show_progress)
    card_sections = laser_sections(laser_results)
    card = model_card(plan, prepared.config_text, card_sections)
    with staged_output(out) as staging:
        gates = BackgroundResult(lambda: compute_gates(plan.config.gate_mode, request))
        write_checkpoint(plan, gates.result, staging, card, options.show_progress)
        verify_checkpoint(plan, staging)
        routing_check = None
        if options.check_routing:
            routing_check = check_positive_prompts(staging, plan.config.experts, request.device)
        if routing_check is not None:
            card = model_card(plan, prepared.config_text, (*card_sections, routing_check_markdown(routing_check)))
            (staging / "README.md").write_text(card, encoding="utf-8")
        check_complete(staging, output_files(plan))
    return routing_check


class BackgroundResult(Generic[T]):
    """Runs `compute` on a daemon thread while the caller goes on; `result()` waits for it.

    The router computation runs this way so that its CPU work overlaps the writer's disk work. Its
    thread uses one intra-op thread, which keeps the router rows bit-identical whatever the
    machine's thread count; an exception in it is re-raised by `result()`.
    """

    def __init__(self, compute: Callable[[], T]) -> None:
        self._compute = compute
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name="frankenmoe-routers", daemon=True).start()

    def _run(self) -> None:
        torch.set_num_threads(1)
        try:
            self._value = self._compute()
        except BaseException as error:  # handed to the caller's thread by result()
            self._error = error
        finally:
            self._done.set()

    def result(self) -> T:
        while not self._done.wait(timeout=0.1):
            pass  # short waits keep the main thread responsive to Ctrl-C
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def output_files(plan: MergePlan) -> list[str]:
    """Every file a finished checkpoint holds: shards, index, config, tokenizer files, model card."""
    shards = [plan.shard_name(shard) for shard in range(plan.shard_count)]
    return [*shards, INDEX_NAME, "config.json", *(source.name for source in plan.tokenizer_files), "README.md"]
