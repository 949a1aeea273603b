"""The GGUF output planned: every tensor with its llama.cpp name, type and size, and the metadata, before a byte is written."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frankenmoe.architectures.gguf import (
    F32_TENSOR_KINDS,
    FALLBACK_TYPE,
    GGUF_ARCHITECTURES,
    GGUF_TYPES,
    GgufArchitecture,
    GgufType,
    llama3_rope_factors,
    rope_parameters,
)
from frankenmoe.architectures.tables import OutputArchitecture, OutputLayout
from frankenmoe.checkpoint.gguf_file import read_gguf_table
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.merging.gguf_vocab import Vocabulary, read_vocabulary
from frankenmoe.merging.plan import MergePlan, TensorJob

GGUF_NAME = "model-{type}.gguf"
"""The GGUF file's name inside OUT, e.g. model-Q8_0.gguf."""


def gguf_type(name: str) -> GgufType:
    """The `--gguf-type` called `name`; a ConfigError listing the types for any other name."""
    entry = GGUF_TYPES.get(name.strip().lower())
    if entry is None:
        raise ConfigError(
            f"GGUF type {name!r} is not one frankenmoe writes. Use one of: {', '.join(GGUF_TYPES)}. For K-quants "
            "(Q4_K_M and the like), write bf16 or f16 and run llama.cpp's `llama-quantize` on the file (docs/gguf.md)."
        )
    return entry


def gguf_file_name(entry: GgufType) -> str:
    return GGUF_NAME.format(type=entry.tensor_type.name)


@dataclass(frozen=True)
class GgufTensor:
    """One GGUF tensor: its name, shape (PyTorch order), type, and the plan jobs whose rows fill it, in order."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    """gguf.GGMLQuantizationType."""
    jobs: tuple[TensorJob, ...] = ()
    permute_heads: tuple[int, int] | None = None
    """(heads, heads of this projection): rows regrouped per head as llama.cpp's llama rope expects."""
    values: tuple[float, ...] = ()
    """A tensor computed from the config alone (llama3 rope frequencies)."""
    fallback: bool = False
    """Written as FALLBACK_TYPE because its rows do not divide into the requested type's blocks."""

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, block_bytes = GGML_QUANT_SIZES[self.tensor_type]
        return math.prod(self.shape) // block * block_bytes


@dataclass(frozen=True)
class GgufPlan:
    """Everything decided before a GGUF is written: the merge plan, the type, every tensor, the tokenizer."""

    config: dict[str, Any]
    """The output's config.json."""
    output: OutputArchitecture
    type: GgufType
    architecture: GgufArchitecture
    tensors: tuple[GgufTensor, ...]
    vocabulary: Vocabulary
    name: str

    @property
    def file_name(self) -> str:
        return gguf_file_name(self.type)

    @property
    def data_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def fallbacks(self) -> tuple[GgufTensor, ...]:
        return tuple(tensor for tensor in self.tensors if tensor.fallback)


def plan_gguf(plan: MergePlan, type_name: str, name: str, tokenizer_folder: Path | None = None) -> GgufPlan:
    """Decide every GGUF tensor and read the tokenizer; refuses what llama.cpp could not run, before writing.

    `tokenizer_folder` holds the tokenizer files (a checkpoint being converted); by default they are
    the plan's (the base model's), read beside the output's config.json as the converter reads them.
    """
    with _tokenizer_view(plan, tokenizer_folder) as folder:
        return gguf_plan_for(plan.jobs, plan.output_config, plan.architecture, plan.layout, type_name, name, folder)


def gguf_plan_for(
    jobs: tuple[TensorJob, ...],
    config: dict[str, Any],
    output: OutputArchitecture,
    layout: OutputLayout,
    type_name: str,
    name: str,
    tokenizer_folder: Path,
) -> GgufPlan:
    """The GGUF plan of an output described by its tensor jobs and config.json (a merge's, or a checkpoint's)."""
    entry = gguf_type(type_name)
    architecture = GGUF_ARCHITECTURES.get(output.model_type)
    if architecture is None:
        raise ConfigError(f"Writing {output.model_type} as GGUF is not supported; write safetensors.")
    if any(tensor.stacked for tensor in layout.expert_tensors):
        raise ConfigError(
            f"Layout {layout.name} names safetensors tensors; a GGUF stacks the experts its own way. "
            "Leave --layout out with --format gguf (or convert a classic-layout checkpoint)."
        )
    mismatch = output.llama_cpp_mismatch(config)
    if mismatch is not None:  # a GGUF is for llama.cpp: one it would compute differently is refused
        raise ConfigError(mismatch)
    tensors = tuple(_gguf_tensors(jobs, config, output, layout, architecture, entry))
    vocabulary = read_vocabulary(tokenizer_folder, config, architecture)
    return GgufPlan(config, output, entry, architecture, tensors, vocabulary, name)


def _gguf_tensors(
    all_jobs: tuple[TensorJob, ...],
    config: dict[str, Any],
    output: OutputArchitecture,
    layout: OutputLayout,
    architecture: GgufArchitecture,
    entry: GgufType,
) -> Iterator[GgufTensor]:
    """The GGUF tensors in the jobs' order; each layer's routed experts stacked where its last expert was."""
    from gguf import get_tensor_name_map

    layers = int(config["num_hidden_layers"])
    experts = int(config[output.expert_count_key])
    names = get_tensor_name_map(architecture.arch, layers)
    stacks: dict[str, tuple[str, int]] = {}
    for layer in range(layers):
        for part, stack in zip(("gate_proj", "up_proj", "down_proj"), architecture.expert_stack, strict=True):
            template = next(tensor.template for tensor in layout.expert_tensors if tensor.parts == (part,))
            for expert in range(experts):
                stacks[template.format(layer=layer, expert=expert)] = (stack.format(layer=layer), expert)
    jobs = {job.name: job for job in all_jobs}
    stacked: dict[str, list[TensorJob]] = {}
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    rope = rope_parameters(config)
    if architecture.permute_qk and rope.get("rope_type") == "llama3":
        values = llama3_rope_factors(config, rope)
        yield GgufTensor(
            "rope_freqs.weight", (len(values),), _type_for("rope_freqs.weight", (len(values),), entry)[0], values=values
        )
    for job in all_jobs:
        if job.name in stacks:
            stack, expert = stacks[job.name]
            stacked.setdefault(stack, []).append(job)
            if expert == experts - 1:
                members = stacked.pop(stack)
                shape = (len(members), *members[0].shape)
                yield _tensor(stack, shape, entry, tuple(members))
            continue
        gguf_name = names.get_name(job.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"llama.cpp's {architecture.name} architecture has no tensor for {job.name}.")
        permute = None
        if architecture.permute_qk and job.name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = (heads, heads)
        elif architecture.permute_qk and job.name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = (heads, kv_heads)
        yield _tensor(gguf_name, job.shape, entry, (jobs[job.name],), permute)


def _tensor(
    name: str,
    shape: tuple[int, ...],
    entry: GgufType,
    jobs: tuple[TensorJob, ...],
    permute: tuple[int, int] | None = None,
) -> GgufTensor:
    tensor_type, fallback = _type_for(name, shape, entry)
    return GgufTensor(name, shape, tensor_type, jobs, permute, fallback=fallback)


def _type_for(name: str, shape: tuple[int, ...], entry: GgufType) -> tuple[Any, bool]:
    """llama.cpp's converter's rule: float32 for 1-D tensors, norms, biases, routers; else the type, or F16
    when the rows do not divide into its blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = name.split(".")[-2] if name.startswith("blk.") else ""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or kind in F32_TENSOR_KINDS:
        return GGMLQuantizationType.F32, False
    block, _ = GGML_QUANT_SIZES[entry.tensor_type]
    if shape[-1] % block:
        return FALLBACK_TYPE, True
    return entry.tensor_type, False


class _TokenizerView:
    """A scratch folder holding the tokenizer files and the output's config.json (what the converter reads)."""

    def __init__(self, plan: MergePlan, folder: Path | None) -> None:
        self._plan, self._folder = plan, folder
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Path:
        if self._folder is not None:
            return self._folder
        self._scratch = tempfile.TemporaryDirectory(prefix="frankenmoe-gguf-")
        folder = Path(self._scratch.name)
        for source in self._plan.tokenizer_files:
            shutil.copyfile(source, folder / source.name)
        (folder / "config.json").write_text(json.dumps(self._plan.output_config, indent=2) + "\n", encoding="utf-8")
        return folder

    def __exit__(self, *_: object) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


def _tokenizer_view(plan: MergePlan, folder: Path | None) -> _TokenizerView:
    return _TokenizerView(plan, folder)


def gguf_problems(path: Path, gplan: GgufPlan) -> list[str]:
    """Re-read the written file's tensor table: every tensor of the plan, with its type, shape and size, and no other."""
    try:
        written = dict(read_gguf_table(path).tensors)
    except (OSError, ValueError) as error:
        return [f"{path.name} cannot be read back as GGUF ({error})"]
    problems = []
    for tensor in gplan.tensors:
        found = written.pop(tensor.name, None)
        if found is None:
            problems.append(f"{tensor.name} is missing")
        elif found.tensor_type != tensor.tensor_type or found.shape != tensor.shape or found.nbytes != tensor.nbytes:
            problems.append(f"{tensor.name} is not the {tensor.tensor_type.name} {list(tensor.shape)} tensor planned")
    problems += [f"{name} was not planned" for name in written]
    return problems


def gguf_card_section(gplan: GgufPlan, routing_checked: bool) -> str:
    """The model card's section on the GGUF file: its type, what stays float32, fallbacks, what the routing
    check (`routing_checked`: the section above) read, how to run it."""
    name = gplan.file_name
    fallbacks = gplan.fallbacks
    lines = [
        "## GGUF",
        "",
        f"`{name}` is a {gplan.type.tensor_type.name} GGUF ({gplan.type.description}) for llama.cpp's "
        f"`{gplan.architecture.name}` architecture, written directly by frankenmoe. Norms, biases, routers and "
        "shared-expert gates are float32.",
    ]
    if fallbacks:
        lines.append(
            f"{len(fallbacks)} tensor(s) whose rows do not divide into {gplan.type.tensor_type.name} blocks are "
            f"{FALLBACK_TYPE.name}: {', '.join(tensor.name for tensor in fallbacks[:8])}"
            + (" ..." if len(fallbacks) > 8 else "")
            + "."
        )
    if routing_checked:
        lines.append(
            "The routing check above routed the prompts through the unquantised weights this file encodes "
            f"(the values before their {gplan.type.tensor_type.name} encoding)."
        )
    lines += [
        "",
        "```",
        f"llama-cli -m {name} -p 'Hello'",
        f"echo 'FROM ./{name}' > Modelfile && ollama create my-moe -f Modelfile",
        "```",
        "",
    ]
    return "\n".join(lines)


def describe_gguf_tensor(tensor: GgufTensor) -> str:
    """One dry-run line: the GGUF tensor's name, shape, type and, for a fallback, why."""
    line = f"{tensor.name:<40} {list(tensor.shape)!s:<22} {tensor.tensor_type.name}"
    if tensor.fallback:
        line += " (fallback: rows do not divide into the type's blocks)"
    return line


OUTPUT_FORMATS = ("safetensors", "gguf")


DEFAULT_GGUF_TYPE = "q8_0"


def resolve_gguf_type(output_format: str, type_name: str | None) -> str | None:
    """The GGUF type a merge writes (None: safetensors), from `--format` and `--gguf-type`; refuses a bad pair."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {output_format!r} is not valid; choose one of: {', '.join(OUTPUT_FORMATS)}.")
    if output_format == "safetensors":
        if type_name is not None:
            raise ConfigError(f"--gguf-type {type_name} applies to GGUF output only; add --format gguf.")
        return None
    return gguf_type(type_name or DEFAULT_GGUF_TYPE).name
