"""What a Mixtral-format checkpoint is made of, and whether its routers can route.

Everything but the routers comes from config.json, the safetensors headers and the model card; the
router diagnostics read one layer's gate matrix at a time, so inspecting a 100 GB checkpoint reads
a few megabytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from frankenmoe.architectures.expected import active_parameters
from frankenmoe.architectures.tables import TOKENIZER_FILES, OutputLayout
from frankenmoe.checkpoint.folder import Checkpoint, load_checkpoint
from frankenmoe.checkpoint.recipe import MergeRecipe, read_recipe
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import (
    SAFETENSORS_TO_CONFIG_DTYPE,
    TensorLocation,
    read_tensor,
)
from frankenmoe.routers.prompts import TOKENIZER_MARKERS

NEAR_DUPLICATE_COSINE = 0.99
"""Two gate rows this aligned give their experts almost the same logit for every token."""
DEGENERATE_CONDITION = 1e3
"""Centred gate rows this ill-conditioned tell the experts apart along fewer directions than they need."""


@dataclass(frozen=True)
class RouterDiagnostics:
    """One layer's gate matrix [experts, hidden], seen as a set of expert directions.

    A softmax router is unchanged by adding one vector to every row (every logit moves by the same
    amount), so only the differences between rows matter: rank and conditioning are those of the
    centred rows (each row minus the mean row), whose rank is at most experts - 1. A healthy
    2-expert router (fit's rows are w and -w) has centred rank 1, which is full.
    """

    layer: int
    row_norms: tuple[float, ...]
    cosine: tuple[tuple[float, ...], ...]
    """Pairwise cosine similarity of the rows (0 where a row is all zeros)."""
    near_duplicates: tuple[tuple[int, int, float], ...]
    """Pairs (i, j, cosine) with cosine above NEAR_DUPLICATE_COSINE."""
    zero_rows: tuple[int, ...]
    rank: int
    """Rank of the centred rows."""
    full_rank: int
    """The most `rank` can be: experts - 1 (or the hidden size, if smaller)."""
    condition_number: float
    """Largest over smallest of the centred rows' `full_rank` singular values; infinite when rank-deficient."""

    @property
    def degenerate(self) -> bool:
        return self.rank < self.full_rank or self.condition_number > DEGENERATE_CONDITION

    @property
    def warnings(self) -> tuple[str, ...]:
        found = [f"experts {i} and {j} are near-duplicates (cosine {cos:.4f})" for i, j, cos in self.near_duplicates]
        found += [f"expert {row} has an all-zero gate row" for row in self.zero_rows]
        if self.rank < self.full_rank:
            found.append(
                f"rank-deficient router (centred rank {self.rank} < {self.full_rank}: some experts' rows are "
                "identical or affinely dependent, so their logits cannot vary independently)"
            )
        elif self.condition_number > DEGENERATE_CONDITION:
            found.append(f"ill-conditioned router (condition number {self.condition_number:.3g})")
        return tuple(found)


@dataclass(frozen=True)
class ShardFile:
    name: str
    bytes: int


@dataclass(frozen=True)
class CheckpointReport:
    path: Path
    architecture: str
    layout: str
    num_layers: int
    num_experts: int
    experts_per_token: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    """The dtype config.json declares, or the stored one when it declares none."""
    stored_dtypes: dict[str, int]
    """Safetensors dtype -> number of parameters stored in it."""
    total_parameters: int
    active_parameters: int
    """Parameters one token passes through: everything except the unchosen experts' MLPs."""
    shards: tuple[ShardFile, ...]
    tokenizer_files: tuple[str, ...]
    recipe: MergeRecipe | None
    routers: tuple[RouterDiagnostics, ...]

    @property
    def tokenizer_present(self) -> bool:
        return any(name in TOKENIZER_MARKERS for name in self.tokenizer_files)

    @property
    def flagged_layers(self) -> tuple[int, ...]:
        return tuple(router.layer for router in self.routers if router.warnings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, as `frankenmoe inspect --json` prints it (see `report_to_dict`)."""
        return report_to_dict(self)


def inspect_checkpoint(path: Path) -> CheckpointReport:
    """Summarise a checkpoint and diagnose every layer's router (one router tensor in memory at a time)."""
    checkpoint = load_checkpoint(path)
    config = checkpoint.config
    layout = checkpoint.layout
    total = sum(math.prod(location.shape) for location in checkpoint.tensors.values())
    expert_total = _expert_parameters(checkpoint, layout)
    stored: dict[str, int] = {}
    for location in checkpoint.tensors.values():
        stored[location.dtype] = stored.get(location.dtype, 0) + math.prod(location.shape)
    files = sorted({location.file for location in checkpoint.tensors.values()})
    return CheckpointReport(
        path=path,
        architecture=", ".join(config.get("architectures") or [str(config.get("model_type"))]),
        layout=layout.name,
        num_layers=checkpoint.num_layers,
        num_experts=checkpoint.num_experts,
        experts_per_token=int(config.get("num_experts_per_tok", 2)),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config[checkpoint.architecture.expert_size_key]),
        vocab_size=int(config["vocab_size"]),
        dtype=str(
            config.get("dtype") or config.get("torch_dtype") or _config_dtype(max(stored, key=stored.__getitem__))
        ),
        stored_dtypes=dict(sorted(stored.items())),
        total_parameters=total,
        active_parameters=active_parameters(
            total,
            expert_total // checkpoint.num_experts,
            checkpoint.num_experts,
            int(config.get("num_experts_per_tok", 2)),
        ),
        shards=tuple(ShardFile(file.name, file.stat().st_size) for file in files),
        tokenizer_files=tuple(
            name for name in TOKENIZER_FILES if name != "generation_config.json" and (path / name).is_file()
        ),
        recipe=read_recipe(path),
        routers=tuple(
            diagnose_router(layer, read_tensor(_router(checkpoint, layout, layer)))
            for layer in range(checkpoint.num_layers)
        ),
    )


def _router(checkpoint: Checkpoint, layout: OutputLayout, layer: int) -> TensorLocation:
    name = layout.router_name(layer)
    if name not in checkpoint.tensors:
        raise ModelError(
            f"{checkpoint.path} has no tensor {name!r} (layer {layer}'s router) although its layer 0 router uses the "
            f"{layout.name} layout. The checkpoint is incomplete; re-download or re-merge it."
        )
    return checkpoint.tensors[name]


def _config_dtype(safetensors_dtype: str) -> str:
    return SAFETENSORS_TO_CONFIG_DTYPE.get(safetensors_dtype, safetensors_dtype)


def _expert_parameters(checkpoint: Checkpoint, layout: OutputLayout) -> int:
    total = 0
    for layer in range(checkpoint.num_layers):
        for tensor in layout.expert_tensors:
            experts = [0] if tensor.stacked else range(checkpoint.num_experts)
            for expert in experts:
                name = tensor.template.format(layer=layer, expert=expert)
                if name not in checkpoint.tensors:
                    raise ModelError(
                        f"{checkpoint.path} has no tensor {name!r} although its layer 0 router uses the "
                        f"{layout.name} layout. The checkpoint is incomplete; re-download or re-merge it."
                    )
                total += math.prod(checkpoint.tensors[name].shape)
    return total


def diagnose_router(layer: int, gate: torch.Tensor) -> RouterDiagnostics:
    """Norms, pairwise cosines, and rank and conditioning of the centred rows of one gate matrix [experts, hidden]."""
    rows = gate.double()
    norms = rows.norm(dim=1)
    is_zero = norms == 0
    unit = rows / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    cosine = (unit @ unit.T).clamp(-1.0, 1.0)
    cosine[is_zero, :] = 0.0
    cosine[:, is_zero] = 0.0
    experts = rows.shape[0]
    near = tuple(
        (i, j, float(cosine[i, j]))
        for i in range(experts)
        for j in range(i + 1, experts)
        if cosine[i, j] > NEAR_DUPLICATE_COSINE
    )
    full_rank = min(experts - 1, rows.shape[1])
    singular = torch.linalg.svdvals(rows - rows.mean(dim=0, keepdim=True))[:full_rank]
    # The rows were stored in at most float32 precision, so differences below that precision of the
    # rows themselves (not of their differences) are rounding noise.
    scale = float(torch.linalg.matrix_norm(rows, ord=2))
    tolerance = scale * max(rows.shape) * torch.finfo(torch.float32).eps
    rank = int((singular > tolerance).sum())
    condition = math.inf
    if rank == full_rank:  # with one expert (full_rank 0) there is nothing to tell apart
        condition = float(singular[0] / singular[-1]) if full_rank else 1.0
    return RouterDiagnostics(
        layer=layer,
        row_norms=tuple(float(norm) for norm in norms),
        cosine=tuple(tuple(float(value) for value in row) for row in cosine),
        near_duplicates=near,
        zero_rows=tuple(int(index) for index in torch.nonzero(is_zero).flatten()),
        rank=rank,
        full_rank=full_rank,
        condition_number=condition,
    )


def report_to_dict(report: CheckpointReport) -> dict[str, Any]:
    """The report as JSON-ready data (an infinite condition number becomes null)."""
    data = asdict(report)
    data["path"] = str(report.path)
    data["tokenizer_present"] = report.tokenizer_present
    data["flagged_layers"] = list(report.flagged_layers)
    for router, router_data in zip(report.routers, data["routers"], strict=True):
        if math.isinf(router.condition_number):
            router_data["condition_number"] = None
        router_data["near_duplicates"] = [
            {"experts": [i, j], "cosine": cosine} for i, j, cosine in router.near_duplicates
        ]
        router_data["degenerate"] = router.degenerate
        router_data["warnings"] = list(router.warnings)
    return data
