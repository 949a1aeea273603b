"""frankenmoe's public Python API; the `frankenmoe` command is its first client.

Every function raises the tool's exception family (frankenmoe.errors: ConfigError exit 2,
ModelError 3, OutputError 4, MergeInterruptedError 130), prints nothing unless asked
(`progress=True` shows tqdm bars on stderr), and never calls sys.exit.

Process-wide state: `merge` gives every buffer over 128 KiB its own memory mapping for the rest
of the process (glibc's mmap threshold, see frankenmoe.memory), as the CLI does: that is what
keeps a merge's peak memory at one layer. The router thread sets its own torch thread count; the
caller's thread settings are not changed.

    >>> import frankenmoe
    >>> prepared = frankenmoe.plan_merge("configs/toy-2x.yaml", "out/", seed=1)  # doctest: +SKIP
    >>> result = frankenmoe.run_merge(prepared)                                    # doctest: +SKIP
    >>> [file.name for file in result.files][:1]                                   # doctest: +SKIP
    ['model-00001-of-00001.safetensors']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures import LAYOUT_NAMES
from frankenmoe.batch import BuildReport, build_configs
from frankenmoe.config import DTYPES, MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.inspection import CheckpointReport, inspect_checkpoint
from frankenmoe.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.pipeline import (
    ConfigInput,
    MergeOptions,
    MergeResult,
    PreparedMerge,
    execute_merge,
    gate_request,
    prepare_merge,
    read_config_input,
    resolve_device,
)
from frankenmoe.plan import DEFAULT_SHARD_BYTES, parse_size
from frankenmoe.routers import Gates, compute_gates
from frankenmoe.routing import (
    PromptRouting,
    RoutingAccuracy,
    RoutingSummary,
    load_checkpoint,
    route_prompts,
    routing_accuracy,
    summarise_routing,
)
from frankenmoe.verification import VerifyReport, verify_output


def load_config(config: Path | str | Mapping[str, Any]) -> MergeConfig:
    """Parse and validate a merge config: a file's path, YAML text, or a dict of the YAML's data.

        >>> load_config({"base_model": "m", "gate_mode": "random", "experts": [{"source_model": "e"}]}).gate_mode
        'random'
    """
    return read_config_input(config)[0]


def plan_merge(
    config: ConfigInput,
    out: Path | str,
    *,
    layout: str | None = None,
    dtype: str | None = None,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    check_routing: bool = True,
    hash_sources: bool = False,
    weight_cache: int | str = 0,
    progress: bool = False,
) -> PreparedMerge:
    """Validate everything and plan every tensor of the merge of `config` into `out`; writes nothing.

    The returned PreparedMerge holds the plan (`.plan.jobs`: every tensor, its source and shard),
    `out` and the options, so `run_merge(prepared)` cannot disagree with what was planned.

        >>> prepared = plan_merge("configs/toy-2x.yaml", "out/")   # doctest: +SKIP
        >>> prepared.plan.architecture.model_type                   # doctest: +SKIP
        'mixtral'
    """
    options = plan_options(
        layout=layout,
        dtype=dtype,
        shard_size=shard_size,
        seed=seed,
        device=device,
        force=force,
        check_routing=check_routing,
        hash_sources=hash_sources,
        weight_cache=weight_cache,
        progress=progress,
    )
    return prepare_merge(config, Path(out), options)


def plan_options(
    *,
    layout: str | None = None,
    dtype: str | None = None,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    check_routing: bool = True,
    hash_sources: bool = False,
    weight_cache: int | str = 0,
    progress: bool = False,
) -> MergeOptions:
    """The merge options `plan_merge` and `build` take, as one typed value (validated).

    Sizes (`shard_size`, `weight_cache`) are byte counts or text such as "5GB" or "500MiB".
    """
    if layout is not None and layout not in LAYOUT_NAMES:
        raise ConfigError(f"layout {layout!r} is not valid; choose one of: {', '.join(LAYOUT_NAMES)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(DTYPES)}.")
    return MergeOptions(
        layout=layout,
        dtype=dtype,
        shard_bytes=parse_size(shard_size) if isinstance(shard_size, str) else shard_size,
        seed=seed,
        device=device,
        force=force,
        show_progress=progress,
        check_routing=check_routing,
        hash_sources=hash_sources,
        weight_cache_bytes=parse_size(str(weight_cache), "Weight cache", minimum=0),
    )


def run_merge(prepared: PreparedMerge) -> MergeResult:
    """Execute a planned merge: routers, staged write, verification, routing check, manifest, swap.

        >>> result = run_merge(plan_merge("configs/toy-2x.yaml", "out/"))   # doctest: +SKIP
        >>> result.architecture                                              # doctest: +SKIP
        'mixtral'
    """
    keep_large_buffers_out_of_the_heap()
    return execute_merge(prepared)


def compute_routers(prepared: PreparedMerge) -> Gates:
    """The router rows (and shared-expert gates) the planned merge would write, in float32; writes nothing.

    For trying router settings without writing a checkpoint each time.

        >>> compute_routers(plan_merge("configs/toy-2x.yaml", "out/")).router.shape   # doctest: +SKIP
        torch.Size([4, 2, 128])
    """
    return compute_gates(prepared.plan.config.gate_mode, gate_request(prepared.plan, prepared.options))


def merge(config: ConfigInput, out: Path | str, **options: Any) -> MergeResult:
    """Plan and run a merge in one call; `options` are `plan_merge`'s keyword arguments.

        >>> merge("configs/toy-2x.yaml", "out/", seed=1).total_parameters   # doctest: +SKIP
        5505024
    """
    return run_merge(plan_merge(config, out, **options))


def inspect(checkpoint: Path | str) -> CheckpointReport:
    """What a MoE checkpoint holds and how healthy its routers are (reads headers and routers only).

        >>> inspect("out/").num_experts   # doctest: +SKIP
        2
    """
    return inspect_checkpoint(Path(checkpoint))


@dataclass(frozen=True)
class RouteResult:
    """Where each prompt's tokens go: per-prompt routings, their summary, and accuracy when labelled."""

    routings: tuple[PromptRouting, ...]
    summary: RoutingSummary
    accuracy: RoutingAccuracy | None = None


def route(
    checkpoint: Path | str,
    prompts: Sequence[str],
    *,
    labels: Sequence[int] | None = None,
    device: str = "cpu",
) -> RouteResult:
    """Route `prompts` through a checkpoint; with `labels` (the expert each prompt should reach), accuracy too.

        >>> route("out/", ["def f(x):"]).summary.mean_entropy   # doctest: +SKIP
        0.41
    """
    loaded = load_checkpoint(Path(checkpoint))
    routings = route_prompts(loaded, list(prompts), resolve_device(device))
    accuracy = None if labels is None else routing_accuracy(routings, list(labels))
    return RouteResult(tuple(routings), summarise_routing(routings), accuracy)


def verify(checkpoint: Path | str) -> VerifyReport:
    """Re-hash a checkpoint's files against its manifest and check its tensors against its config.json.

        >>> verify("out/").ok   # doctest: +SKIP
        True
    """
    return verify_output(Path(checkpoint))


def build(
    configs: Sequence[Path | str],
    out_dir: Path | str,
    *,
    rebuild: bool = False,
    fail_fast: bool = False,
    **options: Any,
) -> BuildReport:
    """Merge each config into `out_dir/<config stem>`, skipping outputs whose manifest says they are up to date.

    `options` are `plan_merge`'s keyword arguments (except `force`: an output being rebuilt is replaced,
    which the merge allows only for a folder that is recognisably a checkpoint).

        >>> build(["configs/toy-2x.yaml", "configs/toy-4x.yaml"], "builds/").exit_code   # doctest: +SKIP
        0
    """
    prepared_options = plan_options(**options)
    return build_configs([Path(config) for config in configs], Path(out_dir), prepared_options, rebuild=rebuild, fail_fast=fail_fast)


__all__ = [
    "BuildReport",
    "MergeResult",
    "PreparedMerge",
    "RouteResult",
    "VerifyReport",
    "build",
    "compute_routers",
    "inspect",
    "load_config",
    "merge",
    "plan_merge",
    "route",
    "run_merge",
    "verify",
]
