"""`inspect` judges a router by the differences between its rows, which are all a softmax router sees.

Adding one vector to every gate row adds the same amount to every logit, so it changes no routing:
rank and conditioning are those of the centred rows (row minus mean row), and rank experts - 1 is
full. Each matrix below is a mean-zero matrix M, whose singular values are known by hand, plus a
common offset that must change nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frankenmoe.analysis.inspect import diagnose_router
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

OFFSET = torch.tensor([0.0, 0.0, 0.0, 5.0])
"""A direction none of the mean-zero rows below uses: the common part fit's rows never had."""


def with_offset(centred: list[list[float]], offset: bool) -> torch.Tensor:
    rows = torch.tensor([[*row, *[0.0] * (4 - len(row))] for row in centred])
    return rows + OFFSET if offset else rows


TWO_EXPERTS = [[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]]
"""fit's 2-expert router: rows w and -w (singular value sqrt(2) |w|, the only one)."""
THREE_EXPERTS = [[2.0, 0.0], [-1.0, math.sqrt(3)], [-1.0, -math.sqrt(3)]]
"""Orthogonal columns of squared norm 6 and 6: singular values sqrt(6), sqrt(6), condition 1."""
FOUR_EXPERTS = [[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]
"""A regular tetrahedron: orthogonal columns of squared norm 4, singular values 2, 2, 2, condition 1."""


@pytest.mark.parametrize("offset", [False, True], ids=["centred", "with a common offset"])
@pytest.mark.parametrize(
    ("centred", "experts"), [(TWO_EXPERTS, 2), (THREE_EXPERTS, 3), (FOUR_EXPERTS, 4)], ids=["2", "3", "4"]
)
def test_a_healthy_router_has_full_centred_rank_and_no_warning(
    centred: list[list[float]], experts: int, offset: bool
) -> None:
    diagnostics = diagnose_router(0, with_offset(centred, offset))

    assert (diagnostics.rank, diagnostics.full_rank) == (experts - 1, experts - 1)
    assert diagnostics.condition_number == pytest.approx(1.0)
    assert diagnostics.degenerate is False
    assert diagnostics.warnings == ()


@pytest.mark.parametrize(
    ("rows", "tied", "rank"),
    [
        ([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]], (0, 1), 0),
        ([[2.0, 0.0], [-1.0, 1.0], [2.0, 0.0]], (0, 2), 1),
        ([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], (0, 3), 2),
    ],
    ids=["2", "3", "4"],
)
def test_two_experts_that_always_tie_are_still_flagged(
    rows: list[list[float]], tied: tuple[int, int], rank: int
) -> None:
    experts = len(rows)

    diagnostics = diagnose_router(0, with_offset(rows, True))

    assert (diagnostics.rank, diagnostics.full_rank) == (rank, experts - 1)
    assert math.isinf(diagnostics.condition_number) and diagnostics.degenerate
    assert f"experts {tied[0]} and {tied[1]} are near-duplicates (cosine 1.0000)" in diagnostics.warnings
    assert (
        f"rank-deficient router (centred rank {rank} < {experts - 1}: some experts' rows are identical or affinely "
        "dependent, so their logits cannot vary independently)"
    ) in diagnostics.warnings


def test_conditioning_is_that_of_the_differences_between_rows() -> None:
    # Centred rows (2a, 0), (-a, 1), (-a, -1): singular values sqrt(2) and sqrt(6) a, condition 1 / (sqrt(3) a).
    # The offset makes the raw rows well conditioned, which must not hide the tiny first difference.
    a = 1e-4 / math.sqrt(3)

    diagnostics = diagnose_router(0, with_offset([[2 * a, 0.0], [-a, 1.0], [-a, -1.0]], True))

    assert diagnostics.rank == 2
    assert diagnostics.condition_number == pytest.approx(1e4)
    assert diagnostics.warnings == ("ill-conditioned router (condition number 1e+04)",)


def test_inspect_does_not_flag_a_two_expert_fit_merge(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "fit.yaml",
        tiny_models.base,
        tiny_models.experts[:2],
        gate_mode="fit",
        router={"continuation_tokens": 0},
    )
    assert run_cli("merge", config, tmp_path / "out", "--no-check").exit_code == 0
    gates = load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")

    report = json.loads(run_cli("inspect", tmp_path / "out", "--json").stdout)
    text = run_cli("inspect", tmp_path / "out").output

    for layer in range(2):  # the premise: fit's rows are w and -w, raw rank 1
        gate = gates[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate[0], -gate[1])
    assert [(router["rank"], router["full_rank"]) for router in report["routers"]] == [(1, 1), (1, 1)]
    assert report["flagged_layers"] == []
    assert "rank-deficient" not in text and "no router problems found" in text
