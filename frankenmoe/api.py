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

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from frankenmoe.analysis.evaluate import DEFAULT_WINDOW, DomainText, EvaluationReport, evaluate_checkpoint
from frankenmoe.analysis.inspect import (
    DEGENERATE_CONDITION,
    NEAR_DUPLICATE_COSINE,
    CheckpointReport,
    inspect_checkpoint,
)
from frankenmoe.analysis.routing import (
    PromptRouting,
    RoutingAccuracy,
    RoutingSummary,
    accuracy_to_dict,
    content_texts,
    expert_names,
    load_labels,
    read_prompts_file,
    route_prompts,
    routing_accuracy,
    routing_to_dict,
    summarise_routing,
)
from frankenmoe.analysis.verify import VerifyReport, verify_output
from frankenmoe.architectures.tables import LAYOUT_NAMES
from frankenmoe.checkpoint.folder import load_checkpoint
from frankenmoe.checkpoint.manifest import FileRecord
from frankenmoe.checkpoint.recipe import read_recipe
from frankenmoe.config.schema import DTYPES, MergeConfig
from frankenmoe.errors import ConfigError
from frankenmoe.merging.batch import BuildInterrupted, BuildReport, build_configs
from frankenmoe.merging.describe import describe_plan, describe_result
from frankenmoe.merging.plan import DEFAULT_SHARD_BYTES, parse_size
from frankenmoe.merging.prepare import (
    ConfigInput,
    LoadedConfig,
    MergeOptions,
    MergeResult,
    PreparedMerge,
    gate_request,
    load_config_input,
    prepare_merge,
    read_config_input,
    resolve_device,
)
from frankenmoe.merging.run import execute_merge
from frankenmoe.routers import Gates, compute_gates
from frankenmoe.runtime.memory import keep_large_buffers_out_of_the_heap
from frankenmoe.sources.hub import offline

P = ParamSpec("P")
R = TypeVar("R")
MAX_SEED = 2**64 - 1
"""torch generators take seeds up to 2**64 - 1."""


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
        _check_flag(name, value)
    _check_device(device)
    return MergeOptions(
        layout=layout,
        dtype=dtype,
        shard_bytes=_size(shard_size, "Shard size", "shard_size", minimum=1),
        seed=_seed(seed),
        device=device,
        force=force,
        show_progress=progress,
        check_routing=check_routing,
        hash_sources=hash_sources,
        weight_cache_bytes=_size(weight_cache, "Weight cache", "weight_cache", minimum=0),
        gguf_type=resolve_gguf_type(output_format, gguf_type),
        stream_sources=stream_sources,
    )


def _check_flag(name: str, value: object) -> None:
    # "false" and 0 would otherwise be read as truthy or falsy by accident.
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, not {value!r} ({type(value).__name__}).")


def _seed(value: object) -> int:
    """A seed torch takes: a whole number from 0 to MAX_SEED (not a bool, a float or text)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(
            f"seed {value!r} is not valid (--seed): use a whole number from 0 to {MAX_SEED} (the range torch's "
            "random generators take)."
        )
    return value


def _size(value: object, what: str, name: str, minimum: int) -> int:
    """A byte count given as an int or as text such as "5GB" (parsed as the CLI parses it)."""
    if isinstance(value, str):
        if not math.isfinite(_size_number(value)):
            raise ConfigError(f"{what} {value!r} is not a size. Use a byte count or a value like 5GB, 500MB, 2GiB.")
        return parse_size(value, what, minimum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f'{name} {value!r} is not valid: give a whole number of bytes (an int) or text like "5GB", "500MiB".'
        )
    if value < minimum:
        raise ConfigError(f"{what} {value!r} must be at least {minimum} byte{'s' if minimum != 1 else ''}.")
    return value


def _size_number(text: str) -> float:
    # parse_size turns the number into an int; nan and inf must be refused before that, not crash it.
    try:
        return float(text.strip().upper().replace(" ", "").rstrip("KMGTIB"))
    except ValueError:
        return 0.0  # not a number at all: parse_size names the problem


def _check_device(device: object) -> None:
    if not isinstance(device, str):
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for a specific GPU).")
    resolve_device(device)


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


@dataclass(frozen=True)
class RouteResult:
    """Where each prompt's tokens go: per-prompt routings, their summary, and accuracy when labelled."""

    routings: tuple[PromptRouting, ...]
    summary: RoutingSummary
    accuracy: RoutingAccuracy | None = None
    expert_names: tuple[str, ...] = ()
    """Each expert's source_model where the checkpoint's model card names them, else `expert N`."""
    labelled: tuple[tuple[PromptRouting, int], ...] = ()
    """The routings `accuracy` was measured on, each with the expert it should reach."""
    checkpoint: Path | None = None
    heatmap: Path | None = None
    """The PNG written with `png=`."""

    def shown_tokens(self) -> tuple[tuple[str, ...], ...]:
        """Each prompt's own tokens (special tokens left out) as text shows them: decoded, spaces made visible."""
        return tuple(tuple(content_texts(routing)) for routing in self.routings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: per-prompt grids and shares, the summary, and accuracy (null when unlabelled)."""
        data = {
            "checkpoint": str(self.checkpoint),
            **routing_to_dict(self.routings, self.summary, self.expert_names),
        }
        routings = [routing for routing, _ in self.labelled]
        labels = [label for _, label in self.labelled]
        accuracy = self.accuracy
        data["accuracy"] = None if accuracy is None else accuracy_to_dict(accuracy, routings, labels, self.expert_names)
        data["png"] = None if self.heatmap is None else str(self.heatmap)
        return data


NO_PROMPTS = (
    "No prompts to route. Pass --prompt TEXT (repeatable), --prompts-file FILE or --labels FILE "
    "(from Python: prompts, prompts_file or labels_file)."
)


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
    from frankenmoe.analysis.plot import require_matplotlib, write_routing_heatmap

    texts = _prompts(prompts)
    if labels is not None and len(labels) != len(texts):
        raise ConfigError(f"labels gives {len(labels)} expert(s) for {len(texts)} prompt(s); give one per prompt.")
    if not texts and prompts_file is None and labels_file is None:
        raise ConfigError(NO_PROMPTS)
    _check_device(device)
    if png is not None:
        require_matplotlib()
    path = Path(checkpoint)
    loaded = load_checkpoint(path)
    recipe = read_recipe(path)
    sources = recipe.expert_sources if recipe else ()
    if prompts_file is not None:
        texts += read_prompts_file(Path(prompts_file))
    from_file = [] if labels_file is None else load_labels(Path(labels_file), loaded.num_experts, sources)
    texts += list(dict.fromkeys(item.text for item in from_file if item.text not in texts))
    if not texts:
        raise ConfigError(NO_PROMPTS)
    routings = route_prompts(loaded, texts, resolve_device(device))
    by_text = {routing.prompt.text: routing for routing in routings}
    # `labels` are those of the first prompts (checked above); the prompts file's and the labels file's follow.
    given = zip(routings, labels or (), strict=False)
    labelled = [*given, *((by_text[item.text], item.expert) for item in from_file)]
    accuracy = routing_accuracy(*zip(*labelled, strict=True)) if labelled else None
    summary = summarise_routing(routings)
    names = tuple(expert_names(loaded.num_experts, sources))
    if png is not None:
        write_routing_heatmap(Path(png), routings, summary, names)
    heatmap = None if png is None else Path(png)
    return RouteResult(tuple(routings), summary, accuracy, names, tuple(labelled), path, heatmap)


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


def _prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    texts = list(prompts) if isinstance(prompts, Sequence) else None
    if texts is None or not all(isinstance(text, str) for text in texts):
        raise ConfigError(f"prompts must be a string or a list of strings, not {prompts!r}.")
    return texts


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
    _check_flag("rebuild", rebuild)
    _check_flag("fail_fast", fail_fast)
    prepared_options = plan_options(**options)
    one = isinstance(configs, (str, os.PathLike, MergeConfig))
    paths = [_config_file(config, index) for index, config in enumerate([configs] if one else configs)]
    return build_configs(paths, Path(out_dir), prepared_options, rebuild=rebuild, fail_fast=fail_fast)


def _config_file(config: object, index: int) -> Path:
    """The file `build` reads a config from: each output is named after its config file's stem."""
    if isinstance(config, (str, os.PathLike)):
        return Path(config)
    if isinstance(config, LoadedConfig) and config.source_path is not None:
        read_config_input(config)  # refuses one changed since it was loaded: build reads the file
        return config.source_path
    raise ConfigError(
        f"configs[{index}] is not a config file: build names each output after its config file "
        "(OUT_DIR/<file stem>), so it needs the file's path, or load_config's result for a file. Write the config "
        "to a .yaml file and pass that, or use merge() for a config held in memory."
    )


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
