"""The prepared merge is what runs: the config file is read once, and laser's ranks are decided while planning."""

from __future__ import annotations

import builtins
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import frankenmoe
from frankenmoe.merging import laser as laser_analysis
from frankenmoe.merging import planning
from frankenmoe.merging.laser import truncate
from frankenmoe.merging.laser_plan import LaserTarget
from frankenmoe.merging.prepare import MergeOptions, prepare_merge
from frankenmoe.merging.run import execute_merge
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

CPU = torch.device("cpu")


def count_opens(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    """Record every open of `path` (by the built-in open, which Path.open and Path.read_text use)."""
    opened: list[str] = []
    original = builtins.open

    def counting(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            opened.append(str(file))
        return original(file, *args, **kwargs)

    opener: Callable[..., Any] = counting
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)
    return opened


def test_a_merge_reads_its_config_file_once(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "merge.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    opened = count_opens(monkeypatch, config)
    result = frankenmoe.merge(config, tmp_path / "out", check_routing=False)
    assert len(opened) == 1
    # The one read is the text the model card and manifest record.
    assert result.manifest["config"] == config.read_text()


def test_a_build_reads_each_config_once_per_use(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "toy.yaml", tiny_models.base, tiny_models.experts[:2], gate_mode="random")
    opened = count_opens(monkeypatch, config)
    assert frankenmoe.build([config], tmp_path / "built", check_routing=False).exit_code == 0
    assert len(opened) == 1  # no output yet: the merge's read alone
    opened.clear()
    assert frankenmoe.build([config], tmp_path / "built", check_routing=False).exit_code == 0
    assert len(opened) == 1  # up to date: the staleness check's read alone
    config.write_text(config.read_text().replace("gate_mode: random", "gate_mode: uniform_random"))
    opened.clear()
    assert frankenmoe.build([config], tmp_path / "built", check_routing=False).exit_code == 0
    assert len(opened) == 2  # stale: the check reads it to compare, then the rebuild reads what it merges


def laser_config(path: Path, tiny_models: TinyModels, laser: dict[str, Any], **top_level: Any) -> Path:
    data = {
        "base_model": str(tiny_models.base),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(tiny_models.experts[0]), "laser": laser},
            {"source_model": str(tiny_models.experts[1])},
        ],
        **top_level,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_laser_merge_writes_the_ranks_decided_while_planning(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    laser = {"method": "fixed", "matrices": ["gate_proj"], "layers": [1], "keep_fraction": 0.1}
    config = laser_config(tmp_path / "merge.yaml", tiny_models, laser)
    out = tmp_path / "out"
    prepared = prepare_merge(config, out, MergeOptions(check_routing=False))

    gate = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    (job,) = (job for job in prepared.plan.jobs if job.name == gate)
    assert job.pieces[0].laser == LaserTarget("experts[0].laser", 1, "gate_proj", keep_rank=6)  # floor(0.1 * 64)
    assert [
        (result.tensor, result.rank_before, result.rank_after, result.reduced) for result in prepared.plan.laser_results
    ] == [("model.layers.1.mlp.gate_proj.weight", 64, 6, True)]
    assert list(prepared.timings) == ["planning", "laser"]

    def analysing(*_: object) -> None:
        raise AssertionError("laser's analysis ran again after planning")

    monkeypatch.setattr(planning, "analyse_lasers", analysing)
    monkeypatch.setattr(laser_analysis, "analyse_group", analysing)
    result = execute_merge(prepared)
    assert result.laser_results == prepared.plan.laser_results
    assert list(result.manifest["timings_s"]) == ["planning", "laser", "writing", "verifying", "routing_check", "total"]
    assert result.timings["laser"] == prepared.timings["laser"]
    source = load_file(tiny_models.experts[0] / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"]
    assert torch.equal(load_file(out / "model-00001-of-00001.safetensors")[gate], truncate(source, 6, CPU))


DRY_RUN_DECISION = re.compile(
    r"  \S+ +(?P<tensor>\S+)  SNR (?P<snr>\S+)  rank (?P<before>\d+) -> (?P<after>\d+)  (?P<note>.+)"
)
CARD_ROW = re.compile(
    r"\| `(?P<group>[^`]+)` \| `(?P<tensor>[^`]+)` \| (?P<snr>\S+) \| (?P<before>\d+) \| (?P<after>\d+) \| (?P<reduced>yes|no) \| (?P<note>.+) \|"
)


def test_the_dry_run_shows_the_laser_decisions_the_model_card_records(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = laser_config(
        tmp_path / "merge.yaml",
        tiny_models,
        {"method": "snr", "top_k": 2},
        base_laser={"method": "fixed", "matrices": ["q_proj"], "layers": [0], "keep_fraction": 0.5},
    )
    dry_run = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry_run.exit_code == 0, dry_run.output
    assert "laser experts[0].laser (method snr, top_k 2): 6 matrices considered, 2 reduced" in dry_run.output
    assert "laser base_laser (method fixed, keep_fraction 0.5): 1 matrices considered, 1 reduced" in dry_run.output
    shown = [match.groupdict() for line in dry_run.output.splitlines() if (match := DRY_RUN_DECISION.fullmatch(line))]

    merged = run_cli("merge", config, tmp_path / "out", "--no-check")
    assert merged.exit_code == 0, merged.output
    card = (tmp_path / "out" / "README.md").read_text()
    recorded = [match.groupdict() for line in card.splitlines() if (match := CARD_ROW.fullmatch(line))]
    assert len(recorded) == len(shown) == 7
    for row, line in zip(recorded, shown, strict=True):
        assert {key: row[key] for key in line} == line
    assert [row["reduced"] for row in recorded].count("yes") == 3
