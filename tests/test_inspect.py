"""`frankenmoe inspect`: checkpoint summary from headers, router diagnostics from the gate tensors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frankenmoe.analysis.inspect import diagnose_router
from frankenmoe.errors import ModelError
from tests.conftest import TinyModels
from tests.support import run_cli, write_config


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 3-expert merge written in both tensor layouts."""
    root = tmp_path_factory.mktemp("inspect")
    config = write_config(root / "config.yaml", tiny_models.base, tiny_models.experts)
    outputs = {}
    for layout in ("classic", "fused"):
        result = run_cli("merge", config, root / layout, "--layout", layout, "--no-check")
        assert result.exit_code == 0, result.output
        outputs[layout] = root / layout
    return outputs


def inspect_json(checkpoint: Path) -> dict:
    result = run_cli("inspect", checkpoint, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_summarises_a_merged_checkpoint(merged: dict[str, Path], tiny_models: TinyModels) -> None:
    report = inspect_json(merged["classic"])

    assert report["architecture"] == "MixtralForCausalLM"
    assert report["layout"] == "classic"
    assert (report["num_layers"], report["num_experts"], report["experts_per_token"]) == (2, 3, 2)
    assert (report["hidden_size"], report["intermediate_size"], report["vocab_size"]) == (64, 128, 32000)
    assert report["dtype"] == "float32"
    stored = load_file(merged["classic"] / "model-00001-of-00001.safetensors")
    assert report["total_parameters"] == sum(tensor.numel() for tensor in stored.values())
    one_expert = 2 * 3 * 128 * 64  # layers x (gate, up, down) x intermediate x hidden
    assert report["active_parameters"] == report["total_parameters"] - (3 - 2) * one_expert
    assert report["shards"] == [
        {
            "name": "model-00001-of-00001.safetensors",
            "bytes": (merged["classic"] / report["shards"][0]["name"]).stat().st_size,
        }
    ]
    assert report["tokenizer_present"] is True
    assert report["recipe"]["expert_sources"] == [str(path) for path in tiny_models.experts]
    assert [router["layer"] for router in report["routers"]] == [0, 1]
    assert report["flagged_layers"] == []


def test_router_diagnostics_of_a_known_matrix() -> None:
    gate = torch.tensor([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 100.0]])

    diagnostics = diagnose_router(4, gate)

    assert diagnostics.row_norms == pytest.approx((1.0, 10.0, 100.0))
    assert diagnostics.cosine == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    # Rank and conditioning are those of the centred rows (tests/test_inspect_rank.py derives why).
    assert (diagnostics.rank, diagnostics.full_rank) == (2, 2)
    singular = torch.linalg.svdvals(gate.double() - gate.double().mean(dim=0))
    assert diagnostics.condition_number == pytest.approx(float(singular[0] / singular[1]))
    assert diagnostics.warnings == ()


def test_ill_conditioned_and_zero_rows_are_flagged() -> None:
    # Centred rows (2a, 0), (-a, 1), (-a, -1) have singular values sqrt(2) and sqrt(6) a: condition 1 / (sqrt(3) a).
    a = 1e-4 / math.sqrt(3)
    ill = diagnose_router(0, torch.tensor([[2 * a, 0.0], [-a, 1.0], [-a, -1.0]]))
    with_zero_row = diagnose_router(0, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))

    assert ill.condition_number == pytest.approx(1e4)
    assert ill.warnings == ("ill-conditioned router (condition number 1e+04)",)
    assert with_zero_row.zero_rows == (1,)
    assert with_zero_row.condition_number == 1.0  # two experts differ along one direction, always well-conditioned
    assert "expert 1 has an all-zero gate row" in with_zero_row.warnings


def test_inspect_flags_two_identical_gate_rows(merged: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "duplicated"
    shutil.copytree(merged["classic"], checkpoint)
    shard = checkpoint / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    gate = tensors["model.layers.1.block_sparse_moe.gate.weight"]
    gate[2] = gate[0]
    save_file(tensors, shard, metadata={"format": "pt"})

    report = inspect_json(checkpoint)
    text = run_cli("inspect", checkpoint).output

    layer_one = report["routers"][1]
    assert layer_one["near_duplicates"] == [{"experts": [0, 2], "cosine": pytest.approx(1.0)}]
    assert (layer_one["rank"], layer_one["full_rank"]) == (1, 2)
    assert layer_one["condition_number"] is None
    assert layer_one["degenerate"] is True
    assert report["flagged_layers"] == [1]
    assert report["routers"][0]["warnings"] == []
    assert "experts 0 and 2 are near-duplicates (cosine 1.0000)" in text
    assert "rank-deficient router (centred rank 1 < 2: some experts' rows are identical" in text
    assert "1 of 2 layer(s) flagged: 1" in text


def test_classic_and_fused_layouts_give_the_same_report(merged: dict[str, Path]) -> None:
    classic, fused = inspect_json(merged["classic"]), inspect_json(merged["fused"])

    layout_specific = ("path", "layout", "shards")
    assert (classic["layout"], fused["layout"]) == ("classic", "fused")
    assert {key: value for key, value in classic.items() if key not in layout_specific} == {
        key: value for key, value in fused.items() if key not in layout_specific
    }


def test_text_report_names_every_section(merged: dict[str, Path]) -> None:
    result = run_cli("inspect", merged["fused"])

    assert result.exit_code == 0, result.output
    for expected in (
        "architecture: MixtralForCausalLM (fused tensor layout)",
        "layers: 2; experts: 3, 2 per token; hidden size 64; intermediate size 128",
        "active per token",
        "dtype: float32 (parameters stored as F32 4,268,736)",
        "shards: 1 file(s)",
        "tokenizer: tokenizer.model",
        "merge recipe (from README.md):",
        "no router problems found",
    ):
        assert expected in result.output


def test_inspect_rejects_a_dense_model(tiny_models: TinyModels) -> None:
    result = run_cli("inspect", tiny_models.base)

    assert result.exit_code == ModelError.exit_code
    assert "not a MoE frankenmoe can read" in result.output


def test_a_missing_later_router_is_a_model_error_naming_the_tensor(merged: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "no-second-router"
    shutil.copytree(merged["classic"], checkpoint)
    shard = checkpoint / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.block_sparse_moe.gate.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = checkpoint / "model.safetensors.index.json"
    index_data = json.loads(index.read_text())
    del index_data["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"]
    index.write_text(json.dumps(index_data))

    result = run_cli("inspect", checkpoint)

    assert result.exit_code == ModelError.exit_code
    assert "no tensor 'model.layers.1.block_sparse_moe.gate.weight' (layer 1's router)" in result.output
    assert "incomplete" in result.output
