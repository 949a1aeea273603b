"""frankenmoe's public Python API; the `frankenmoe` command is its first client.

Every function raises the tool's exception family (frankenmoe.errors: ConfigError exit 2,
ModelError 3, OutputError 4, MergeInterruptedError 130), prints nothing unless asked
(`progress=True` shows tqdm bars on stderr), and never calls sys.exit.

Process-wide state: `merge` gives every buffer over 128 KiB its own memory mapping for the rest
of the process (glibc's mmap threshold, see frankenmoe.runtime.memory), as the CLI does: that is what
keeps a merge's peak memory at one layer. The merge's worker threads run torch with one intra-op
thread each; torch keeps that count process-wide, so every call that runs them (`run_merge`, `merge`,
`build`, `compute_routers`, `route`) puts the caller's `torch.get_num_threads()` back when it returns.

Arguments are checked before any work, with the messages the CLI gives (ConfigError).

    >>> import frankenmoe
    >>> prepared = frankenmoe.plan_merge("configs/toy-2x.yaml", "out/", seed=1)  # doctest: +SKIP
    >>> result = frankenmoe.run_merge(prepared)                                    # doctest: +SKIP
    >>> [file.name for file in result.files][:1]                                   # doctest: +SKIP
    ['model-00001-of-00001.safetensors']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from frankenmoe.analysis.evaluate import DEFAULT_WINDOW, EvaluationReport, evaluate_checkpoint
from frankenmoe.analysis.inspect import (
    DEGENERATE_CONDITION,
    NEAR_DUPLICATE_COSINE,
    CheckpointReport,
    inspect_checkpoint,
)
from frankenmoe.analysis.route import NO_PROMPTS, RouteResult, route_checkpoint
from frankenmoe.analysis.verify import VerifyReport, verify_output
from frankenmoe.analysis.windows import DomainText
from frankenmoe.api.arguments import check_device, check_flag, check_seed, check_size, config_file, prompt_list
from frankenmoe.architectures.tables import LAYOUT_NAMES
from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.config.constants import DTYPES
from frankenmoe.config.schema import MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.merging.batch import BuildInterrupted, BuildReport, build_configs
from frankenmoe.merging.describe import describe_plan, describe_result
from frankenmoe.merging.plan import DEFAULT_SHARD_BYTES
from frankenmoe.merging.prepare import (
    ConfigInput,
    MergeOptions,
    MergeResult,
    PreparedMerge,
    gate_request,
    load_config_input,
    prepare_merge,
    resolve_device,
)
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import Gates, compute_gates
from frankenmoe.runtime.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.sources.hub import offline

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def _callers_torch_threads() -> Iterator[None]:
    """Put the caller's torch thread count back afterwards: the merge's worker threads set theirs to 1,
    and torch keeps that count for the whole process (each thread's first torch call starts from it)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _keeps_torch_threads(function: Callable[P, R]) -> Callable[P, R]:
    @wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with _callers_torch_threads():
            return function(*args, **kwargs)

    return call


def load_config(config: ConfigInput) -> MergeConfig:
    """Parse and validate a merge config: a file's path, YAML text, or a dict of the YAML's data.

    What it returns carries the config's YAML text and file, so `plan_merge`, `merge` and `build`
    accept it as it is.

        >>> load_config({"base_model": "m", "gate_mode": "random", "experts": [{"source_model": "e"}]}).gate_mode
        'random'
    """
    return load_config_input(config)


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
    output_format: str = "safetensors",
    gguf_type: str | None = None,
    stream_sources: bool = False,
) -> PreparedMerge:
    """Validate everything and plan every tensor of the merge of `config` into `out`; writes nothing.

    The returned PreparedMerge holds the plan (`.plan.jobs`: every tensor, its source and shard),
    `out` and the options, so `run_merge(prepared)` cannot disagree with what was planned.

    Planning reads configs and safetensors headers, except for a config with `laser` blocks: their
    analysis (SVDs of the matrices they consider, and a calibration text's perplexity if given) is
    planning's last step, so it reads those weights and takes their time, and `.plan.laser_results`
    holds every considered matrix's decision (rank kept, SNR, verdict) that the merge then applies.

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
        output_format=output_format,
        gguf_type=gguf_type,
        stream_sources=stream_sources,
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
    output_format: str = "safetensors",
    gguf_type: str | None = None,
    stream_sources: bool = False,
) -> MergeOptions:
    """The merge options `plan_merge` and `build` take, as one typed value (validated).

    Sizes (`shard_size`, `weight_cache`) are byte counts or text such as "5GB" or "500MiB".
    `output_format` "gguf" writes one GGUF file of `gguf_type` (default q8_0; see docs/gguf.md).
    `stream_sources` reads Hub sources' tensors over HTTP into the output instead of downloading them
    (docs/hub.md).
    """
    from frankenmoe.merging.gguf_plan import resolve_gguf_type

    if layout is not None and layout not in LAYOUT_NAMES:
        raise ConfigError(f"layout {layout!r} is not valid (--layout); choose one of: {', '.join(LAYOUT_NAMES)}.")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid (--dtype); choose one of: {', '.join(DTYPES)}.")
    flags = {
        "force": force,
        "check_routing": check_routing,
        "hash_sources": hash_sources,
        "progress": progress,
        "stream_sources": stream_sources,
    }
    for name, value in flags.items():
        check_flag(name, value)
    check_device(device)
    return MergeOptions(
        layout=layout,
        dtype=dtype,
        shard_bytes=check_size(shard_size, "Shard size", "shard_size", minimum=1),
        seed=check_seed(seed),
        device=device,
        force=force,
        show_progress=progress,
        check_routing=check_routing,
        hash_sources=hash_sources,
        weight_cache_bytes=check_size(weight_cache, "Weight cache", "weight_cache", minimum=0),
        gguf_type=resolve_gguf_type(output_format, gguf_type),
        stream_sources=stream_sources,
    )


@_keeps_torch_threads
def run_merge(prepared: PreparedMerge) -> MergeResult:
    """Execute a planned merge: routers, staged write, verification, routing check, manifest, swap.

    >>> result = run_merge(plan_merge("configs/toy-2x.yaml", "out/"))   # doctest: +SKIP
    >>> result.architecture                                              # doctest: +SKIP
    'mixtral'
    """
    keep_large_buffers_out_of_the_heap()
    return execute_merge(prepared)


@_keeps_torch_threads
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


@_keeps_torch_threads
def route(
    checkpoint: Path | str,
    prompts: str | Sequence[str] = (),
    *,
    labels: Sequence[int] | None = None,
    device: str = "cpu",
    prompts_file: Path | str | None = None,
    labels_file: Path | str | None = None,
    png: Path | str | None = None,
) -> RouteResult:
    """Route `prompts` (one string is one prompt) through a checkpoint; with `labels` (the expert each
    prompt should reach), accuracy too.

    `prompts_file` adds one prompt per line; `labels_file` (YAML: expert index or source_model name ->
    prompts) adds labelled prompts, routed once each. `png` also draws a heatmap there (needs
    matplotlib, checked before any work).

        >>> route("out/", ["def f(x):"]).summary.mean_entropy   # doctest: +SKIP
        0.41
    """
    from frankenmoe.analysis.plot import require_matplotlib

    texts = prompt_list(prompts)
    if labels is not None and len(labels) != len(texts):
        raise ConfigError(f"labels gives {len(labels)} expert(s) for {len(texts)} prompt(s); give one per prompt.")
    if not texts and prompts_file is None and labels_file is None:
        raise ConfigError(NO_PROMPTS)
    check_device(device)
    if png is not None:
        require_matplotlib()
    return route_checkpoint(Path(checkpoint), texts, labels, resolve_device(device), prompts_file, labels_file, png)


def evaluate(
    checkpoint: Path | str,
    texts: Mapping[str, DomainText],
    *,
    models: Mapping[str, str] | None = None,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> EvaluationReport:
    """Held-out perplexity per domain of the MoE in `checkpoint`, its base and each expert, all streamed.

    `texts` maps a domain name to its text: a Path (text file, folder of .txt files, .jsonl with a
    `text` field), the text itself, a list of documents, or [windows, length] token ids. The base and
    experts come from the checkpoint's manifest; `models` (name -> reference: `base`, `expert0`, ... or
    new names) replaces or adds them. Windows are `window` tokens, one every `stride` (default: the
    window); see frankenmoe.analysis.evaluate.

        >>> report = evaluate("out/", {"code": Path("heldout/code.txt")})   # doctest: +SKIP
        >>> [(row.domain, round(row.kept, 2)) for row in report.domains]   # doctest: +SKIP
        [('code', 0.83)]
    """
    return evaluate_checkpoint(
        Path(checkpoint),
        texts,
        models,
        window=window,
        stride=stride,
        device=resolve_device(device),
        progress=progress,
    )


def verify(checkpoint: Path | str) -> VerifyReport:
    """Re-hash a checkpoint's files against its manifest and check its tensors against its config.json.

    >>> verify("out/").ok   # doctest: +SKIP
    True
    """
    return verify_output(Path(checkpoint))


def convert_to_gguf(checkpoint: Path | str, gguf_type: str = "q8_0", output: Path | str | None = None) -> FileRecord:
    """Write a frankenmoe safetensors checkpoint as one GGUF file of `gguf_type`; the file's name, size and sha256.

    >>> convert_to_gguf("out/", "q8_0").name   # doctest: +SKIP
    'out-Q8_0.gguf'
    """
    from frankenmoe.merging.gguf import convert_checkpoint

    return convert_checkpoint(Path(checkpoint), gguf_type, None if output is None else Path(output))


@_keeps_torch_threads
def build(
    configs: Path | str | MergeConfig | Sequence[Path | str | MergeConfig],
    out_dir: Path | str,
    *,
    rebuild: bool = False,
    fail_fast: bool = False,
    **options: Any,
) -> BuildReport:
    """Merge each config into `out_dir/<config stem>`, skipping outputs whose manifest says they are up to date.

    A config is a file's path, or what `load_config` returned for one. `options` are `plan_merge`'s keyword arguments (except `force`: an output being rebuilt is replaced,
    which the merge allows only for a folder that is recognisably a checkpoint).

        >>> build(["configs/toy-2x.yaml", "configs/toy-4x.yaml"], "builds/").exit_code   # doctest: +SKIP
        0
    """
    check_flag("rebuild", rebuild)
    check_flag("fail_fast", fail_fast)
    prepared_options = plan_options(**options)
    one = isinstance(configs, (str, os.PathLike, MergeConfig))
    paths = [config_file(config, index) for index, config in enumerate([configs] if one else configs)]
    return build_configs(paths, Path(out_dir), prepared_options, rebuild=rebuild, fail_fast=fail_fast)


__all__ = [
    "DEGENERATE_CONDITION",
    "NEAR_DUPLICATE_COSINE",
    "BuildInterrupted",
    "BuildReport",
    "CheckpointReport",
    "EvaluationReport",
    "FileRecord",
    "MergeResult",
    "PreparedMerge",
    "RouteResult",
    "VerifyReport",
    "build",
    "compute_routers",
    "convert_to_gguf",
    "describe_plan",
    "describe_result",
    "evaluate",
    "inspect",
    "load_config",
    "merge",
    "offline",
    "plan_merge",
    "route",
    "run_merge",
    "verify",
]
