"""`frankenmoe verify OUT`: is a checkpoint exactly what its build record says, and consistent in itself?

Two checks. Every file the manifest lists is re-hashed (size and sha256) and nothing else is in the
folder. And the checkpoint agrees with itself: the index lists every tensor exactly once, in the
shard that holds it; the shards hold nothing the index does not list; every tensor the output
architecture's table implies for this config.json is there, with its shape and the config's dtype,
and there is no other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frankenmoe.architectures import (
    EMBEDDINGS,
    FINAL_NORM,
    LAYER_PREFIX,
    LM_HEAD,
    MLP_PARTS,
    OUTPUT_ARCHITECTURES,
    OutputArchitecture,
    OutputLayout,
)
from frankenmoe.errors import FrankenMoEError, ModelError
from frankenmoe.layers import detect_layout
from frankenmoe.manifest import MANIFEST_NAME, file_sha256, read_manifest
from frankenmoe.plan import SAFETENSORS_TO_CONFIG_DTYPE
from frankenmoe.tensor_io import CONFIG_DTYPE_TO_SAFETENSORS, TensorLocation, read_header
from frankenmoe.write import INDEX_NAME


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found: every difference, in words; `ok` when there is none."""

    path: Path
    files_checked: int
    tensors_checked: int
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "files_checked": self.files_checked,
            "tensors_checked": self.tensors_checked,
            "problems": list(self.problems),
        }


def verify_output(folder: Path) -> VerifyReport:
    """Re-hash `folder`'s files against its manifest and check its tensors against its config.

        >>> verify_output(Path("out/")).ok   # doctest: +SKIP
        True
    """
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder. Pass the folder a merge wrote.")
    manifest = read_manifest(folder)
    problems = _file_problems(folder, manifest)
    tensor_problems, tensors = _tensor_problems(folder)
    return VerifyReport(folder, len(manifest["files"]), tensors, (*problems, *tensor_problems))


def _file_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    listed = set()
    for record in manifest["files"]:
        name = str(record.get("name"))
        listed.add(name)
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (the manifest lists it)")
            continue
        size = path.stat().st_size
        if size != record.get("size"):
            problems.append(f"{name}: {size} bytes, the manifest says {record.get('size')}")
        elif file_sha256(path) != record.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest's (the file was changed or damaged)")
    for path in sorted(folder.iterdir()):
        if path.name not in listed and path.name != MANIFEST_NAME and not path.name.startswith("."):
            problems.append(f"{path.name}: not in the manifest (added after the merge)")
    return problems


def _tensor_problems(folder: Path) -> tuple[list[str], int]:
    """Index, shards and config.json against each other and against the architecture's table."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"config.json or {INDEX_NAME} cannot be read ({error})"], 0
    problems: list[str] = []
    stored: dict[str, TensorLocation] = {}
    for shard in sorted(set(map(str, index.values()))):
        try:
            header = read_header(folder / shard)
        except FrankenMoEError as error:
            problems.append(f"{shard}: {error.message}")
            continue
        for name, location in header.items():
            if name in stored:
                problems.append(f"{name}: stored in both {stored[name].file.name} and {shard}")
            stored[name] = location
    for name, shard in index.items():
        if name in stored and stored[name].file.name != shard:
            problems.append(f"{name}: the index says {shard}, but it is in {stored[name].file.name}")
        elif name not in stored and not any(problem.startswith(str(shard)) for problem in problems):
            problems.append(f"{name}: listed in the index, in no shard")
    problems += [f"{name}: in {stored[name].file.name}, not listed in the index" for name in stored if name not in index]
    architecture = OUTPUT_ARCHITECTURES.get(str(config.get("model_type")))
    if architecture is None:
        return [*problems, f"config.json: model_type {config.get('model_type')!r} is not a frankenmoe output"], len(stored)
    try:
        expected = expected_tensors(architecture, detect_layout(architecture, stored), config)
    except (ModelError, KeyError, TypeError, ValueError) as error:
        return [*problems, f"config.json does not describe a {architecture.model_type} checkpoint ({error})"], len(stored)
    dtype = CONFIG_DTYPE_TO_SAFETENSORS.get(str(config.get("torch_dtype") or config.get("dtype")))
    for name, shape in expected.items():
        location = stored.get(name)
        if location is None:
            problems.append(f"{name}: missing (config.json implies it)")
        elif location.shape != shape:
            problems.append(f"{name}: shape {list(location.shape)}, config.json implies {list(shape)}")
        elif dtype is not None and location.dtype != dtype:
            problems.append(
                f"{name}: dtype {SAFETENSORS_TO_CONFIG_DTYPE.get(location.dtype, location.dtype)}, config.json says "
                f"{config.get('torch_dtype') or config.get('dtype')}"
            )
    problems += [f"{name}: an extra tensor {architecture.model_type} has no place for" for name in stored if name not in expected]
    return problems, len(stored)


def expected_tensors(
    architecture: OutputArchitecture, layout: OutputLayout, config: dict[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `architecture` with this config.json holds, with its shape (from the tables)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    expert_size = int(config[architecture.expert_size_key])
    experts = int(config[architecture.expert_count_key])
    dims = {
        "hidden": hidden,
        "vocab": int(config["vocab_size"]),
        "head_dim": head_dim,
        "q_width": heads * head_dim,
        "kv_width": int(config.get("num_key_value_heads") or heads) * head_dim,
        "intermediate": expert_size,
    }
    part_shapes = {"gate_proj": (expert_size, hidden), "up_proj": (expert_size, hidden), "down_proj": (hidden, expert_size)}
    expected = {EMBEDDINGS.name: (dims["vocab"], hidden), FINAL_NORM.name: (hidden,)}
    if not config.get("tie_word_embeddings"):
        expected[LM_HEAD.name] = (dims["vocab"], hidden)
    for layer in range(int(config["num_hidden_layers"])):
        prefix = LAYER_PREFIX.format(layer=layer)
        for weight in architecture.layer_weights:
            expected[prefix + weight.name] = tuple(dims[name] for name in weight.shape)
        for tensor in layout.expert_tensors:
            rows = sum(part_shapes[part][0] for part in tensor.parts)
            columns = part_shapes[tensor.parts[0]][1]
            if tensor.stacked:
                expected[tensor.template.format(layer=layer, expert=0)] = (experts, rows, columns)
            else:
                for expert in range(experts):
                    expected[tensor.template.format(layer=layer, expert=expert)] = (rows, columns)
        expected[layout.router_name(layer)] = (experts, hidden)
        slots = architecture.shared_expert
        if slots is not None:
            shared_size = int(config[slots.size_key])
            shared_shapes = {"gate_proj": (shared_size, hidden), "up_proj": (shared_size, hidden)}
            shared_shapes["down_proj"] = (hidden, shared_size)
            for part in MLP_PARTS:
                expected[slots.mlp[part].format(layer=layer)] = shared_shapes[part]
            expected[slots.gate.format(layer=layer)] = (1, hidden)
    return expected
