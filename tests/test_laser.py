"""Laser: the rank-reduction formulas, the config block, and what a merge with laser writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from frankenmoe.config.parse import parse_config
from frankenmoe.config.schema import LaserConfig
from frankenmoe.decoder.decoder import StreamedDecoder
from frankenmoe.errors import ConfigError, ModelError
from frankenmoe.io.safetensors import read_header
from frankenmoe.merging.card import LASER_HEADING
from frankenmoe.merging.laser import (
    optimal_threshold,
    signal_to_noise,
    singular_values,
    snr_threshold,
    spectrum,
    truncate,
)
from frankenmoe.merging.laser_plan import LaserResult
from frankenmoe.merging.prepare import MergeOptions, prepare_merge
from frankenmoe.sources.model import load_source
from frankenmoe.testing.toymodels import write_toy_model
from tests.conftest import TinyModels
from tests.support import run_cli
from tests.transformers_reference import reference_model

CPU = torch.device("cpu")
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs."
CLASSIC_PARTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def low_rank_plus_noise(rows: int, columns: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    """A rank-len(singular) matrix with the given singular values, plus standard Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, len(singular), generator=generator))[0]
    right = torch.linalg.qr(torch.randn(columns, len(singular), generator=generator))[0]
    return (left * torch.tensor(singular)) @ right.T + torch.randn(rows, columns, generator=generator)


def write_laser_config(
    path: Path,
    base: Path,
    experts: list[Path],
    lasers: dict[int, dict[str, Any]],
    **top_level: Any,
) -> Path:
    data: dict[str, Any] = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(expert), **({"laser": lasers[index]} if index in lasers else {})}
            for index, expert in enumerate(experts)
        ],
        **top_level,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def laser_results(config: Path, out: Path) -> tuple[LaserResult, ...]:
    """The decisions planning made (a merge writes what they say)."""
    return prepare_merge(config, out, MergeOptions(layout="classic")).plan.laser_results


# The formulas


def test_optimal_threshold_recovers_the_true_rank_of_low_rank_plus_noise() -> None:
    weight = low_rank_plus_noise(300, 120, [100.0, 90.0, 80.0, 70.0, 60.0, 50.0])
    values = singular_values(weight, CPU)
    assert int((values > optimal_threshold(values, tuple(weight.shape))).sum()) == 6
    assert spectrum(values, tuple(weight.shape), LaserConfig("optimal", ("gate_proj",))).proposed_rank == 6


def test_snr_matches_a_reference_computation_of_the_formulas() -> None:
    weight = low_rank_plus_noise(200, 80, [60.0, 40.0, 30.0], seed=3)
    values = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    beta = 80 / 200
    sigma = (np.percentile(values, 75) - np.percentile(values, 25)) / 1.349
    tau = sigma * (1 + math.sqrt(beta))
    reference_snr = values[values > tau].sum() / values[values <= tau].sum()

    measured = singular_values(weight, CPU)
    assert snr_threshold(measured, (200, 80)) == pytest.approx(tau, rel=1e-5)
    assert signal_to_noise(measured, tau) == pytest.approx(reference_snr, rel=1e-5)
    result = spectrum(measured, (200, 80), LaserConfig("snr", ("gate_proj",)))
    assert result.snr == pytest.approx(reference_snr, rel=1e-5)
    assert result.proposed_rank == int((values > tau).sum())
    assert result.rank == 80


def test_fixed_keeps_exactly_the_requested_fraction_of_the_rank() -> None:
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    values = singular_values(weight, CPU)
    plan = spectrum(values, (128, 64), LaserConfig("fixed", ("gate_proj",), keep_fraction=0.25))
    assert plan.proposed_rank == 16
    reduced = truncate(weight, plan.proposed_rank, CPU)
    assert reduced.shape == weight.shape
    assert int(torch.linalg.matrix_rank(reduced)) == 16
    # Eckart-Young: the truncated SVD's error is exactly the dropped singular values.
    assert float(torch.linalg.norm(weight - reduced) ** 2) == pytest.approx(float((values[16:] ** 2).sum()), rel=1e-4)


def test_a_threshold_above_every_singular_value_still_keeps_rank_one() -> None:
    pure_noise = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    values = singular_values(pure_noise, CPU)
    assert int((values > optimal_threshold(values, (128, 64))).sum()) == 0
    assert spectrum(values, (128, 64), LaserConfig("optimal", ("gate_proj",))).proposed_rank == 1


def test_float32_singular_values_give_the_same_decisions_as_float64() -> None:
    weight = low_rank_plus_noise(256, 96, [80.0, 60.0, 40.0, 20.0], seed=5).to(torch.bfloat16).float()
    single = singular_values(weight, CPU)
    double = torch.linalg.svdvals(weight.double())
    assert torch.allclose(single.double(), double, rtol=1e-5)
    for method in ("snr", "optimal"):
        settings = LaserConfig(method, ("gate_proj",))
        from_single, from_double = spectrum(single, (256, 96), settings), spectrum(double, (256, 96), settings)
        assert (from_single.rank, from_single.proposed_rank) == (from_double.rank, from_double.proposed_rank)
        assert from_single.snr == pytest.approx(from_double.snr, rel=1e-6)


# The config block


def config_text(expert: dict[str, Any], **top_level: Any) -> str:
    common = {"base_model": "b", "gate_mode": "random", "experts_per_token": 1}
    return yaml.safe_dump({**common, "experts": [{"source_model": "e", **expert}], **top_level})


def laser_block(**laser: Any) -> str:
    return config_text({"laser": laser})


def test_laser_block_parses_groups_ranges_and_defaults() -> None:
    config = parse_config(laser_block(method="snr", matrices=["mlp"], layers="20-23", top_k=15))
    assert config.experts[0].laser == LaserConfig(
        method="snr", matrices=("gate_proj", "up_proj", "down_proj"), layers=(20, 21, 22, 23), top_k=15
    )
    fixed = parse_config(laser_block(method="fixed", matrices=["down_proj", "gate_proj"], keep_fraction=1))
    assert fixed.experts[0].laser == LaserConfig("fixed", ("down_proj", "gate_proj"), "all", keep_fraction=1.0)
    listed = parse_config(laser_block(method="optimal", layers=[3, 1, 3], calibration="text.txt"))
    assert listed.experts[0].laser == LaserConfig(
        "optimal", ("gate_proj", "up_proj", "down_proj"), (1, 3), calibration="text.txt"
    )
    base = parse_config(
        config_text({}, base_laser={"method": "optimal", "matrices": "attention", "layers": "last_half"})
    )
    assert base.base_laser == LaserConfig("optimal", ("q_proj", "k_proj", "v_proj", "o_proj"), "last_half")
    assert base.experts[0].laser is None


@pytest.mark.parametrize(
    ("laser", "message"),
    [
        ({"method": "snr", "topk": 3}, "unknown key `experts[0].laser.topk`. Did you mean `top_k`?"),
        ({"matrices": ["mlp"]}, "`experts[0].laser.method` is required"),
        ({"method": "svd"}, "`experts[0].laser.method` is 'svd'; it must be one of: snr, fixed, optimal"),
        ({"method": "fixed"}, "needs `keep_fraction`"),
        ({"method": "fixed", "keep_fraction": 0}, "`experts[0].laser.keep_fraction` is 0.0; it must be greater than 0"),
        ({"method": "fixed", "keep_fraction": 1.5}, "`experts[0].laser.keep_fraction` is 1.5"),
        ({"method": "snr", "keep_fraction": 0.1}, "`experts[0].laser.keep_fraction` only applies to method `fixed`"),
        ({"method": "optimal", "top_k": 3}, "`experts[0].laser.top_k` only applies to method `snr`"),
        ({"method": "snr", "top_k": 0}, "`experts[0].laser.top_k` is 0; it must be 1 or more"),
        ({"method": "snr", "layers": "31-20"}, "`experts[0].laser.layers` is the range '31-20'"),
        ({"method": "snr", "layers": "late"}, "`experts[0].laser.layers` is 'late'; it must be `all`, `last_half`"),
        ({"method": "snr", "layers": [1, -2]}, "`experts[0].laser.layers[1]` is -2"),
        ({"method": "snr", "layers": []}, "`experts[0].laser.layers` is an empty list"),
        ({"method": "snr", "matrices": ["q_proj"]}, "`experts[0].laser.matrices[0]` is 'q_proj'; it must be one of"),
    ],
)
def test_bad_laser_blocks_are_config_errors_naming_the_key(laser: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(laser_block(**laser), "merge.yaml")
    assert message in caught.value.message
    assert caught.value.message.startswith("merge.yaml: ")


def test_base_laser_accepts_only_attention_matrices() -> None:
    text = config_text({}, base_laser={"method": "optimal", "matrices": ["mlp"]})
    with pytest.raises(ConfigError, match=r"`base_laser.matrices\[0\]` is 'mlp'"):
        parse_config(text)


def test_layer_outside_the_model_is_reported_when_planning(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_laser_config(
        tmp_path / "merge.yaml",
        tiny_models.base,
        list(tiny_models.experts[:2]),
        {1: {"method": "snr", "layers": "1-2"}},
    )
    with pytest.raises(ConfigError, match=r"`experts\[1\].laser.layers` selects layer 2, but model .* has 2 layers"):
        prepare_merge(config, tmp_path / "out", MergeOptions())


def test_missing_calibration_file_is_reported_when_planning(tiny_models: TinyModels, tmp_path: Path) -> None:
    laser = {"method": "snr", "calibration": str(tmp_path / "nowhere.txt")}
    config = write_laser_config(tmp_path / "merge.yaml", tiny_models.base, list(tiny_models.experts[:2]), {0: laser})
    with pytest.raises(ConfigError, match=r"`experts\[0\].laser.calibration` names .*nowhere.txt"):
        prepare_merge(config, tmp_path / "out", MergeOptions())


# Merges with laser


def test_laser_changes_only_the_selected_matrices(tiny_models: TinyModels, tmp_path: Path) -> None:
    experts = list(tiny_models.experts[:2])
    config = write_laser_config(
        tmp_path / "merge.yaml",
        tiny_models.base,
        experts,
        {0: {"method": "fixed", "matrices": ["gate_proj"], "layers": [1], "keep_fraction": 0.1}},
        base_laser={"method": "fixed", "matrices": ["q_proj"], "layers": [0], "keep_fraction": 0.5},
    )
    out = tmp_path / "out"
    result = run_cli("merge", config, out)
    assert result.exit_code == 0, result.output

    written = tensors_of(out)
    base = load_file(tiny_models.base / "model.safetensors")
    sources = [load_file(expert / "model.safetensors") for expert in experts]
    reduced_gate = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    reduced_query = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(written[reduced_gate], truncate(sources[0]["model.layers.1.mlp.gate_proj.weight"], 6, CPU))
    assert torch.equal(written[reduced_query], truncate(base[reduced_query], 32, CPU))
    assert int(torch.linalg.matrix_rank(written[reduced_gate])) == 6
    assert int(torch.linalg.matrix_rank(written[reduced_query])) == 32

    compared = 0
    for name, tensor in written.items():
        if name in (reduced_gate, reduced_query) or ".gate.weight" in name:
            continue
        if ".experts." in name:
            parts = name.split(".")
            layer, expert, kind = parts[2], int(parts[5]), parts[6]
            expected = sources[expert][f"model.layers.{layer}.mlp.{CLASSIC_PARTS[kind]}.weight"]
        else:
            expected = base[name]
        assert torch.equal(tensor, expected), name
        compared += 1
    assert compared == len(written) - 2 - 2  # two reduced matrices, two routers

    card = (out / "README.md").read_text()
    assert LASER_HEADING in card
    assert "| `experts[0].laser` | `model.layers.1.mlp.gate_proj.weight` |" in card
    assert "| 64 | 6 | yes | reduced |" in card
    assert "| `base_laser` | `model.layers.0.self_attn.q_proj.weight` |" in card


def test_laser_in_the_fused_layout_reduces_only_that_experts_slice(tiny_models: TinyModels, tmp_path: Path) -> None:
    experts = list(tiny_models.experts[:2])
    config = write_laser_config(
        tmp_path / "merge.yaml",
        tiny_models.base,
        experts,
        {1: {"method": "fixed", "matrices": ["up_proj"], "layers": [0], "keep_fraction": 0.05}},
    )
    out = tmp_path / "out"
    assert run_cli("merge", config, out, "--layout", "fused").exit_code == 0
    written = tensors_of(out)
    sources = [load_file(expert / "model.safetensors") for expert in experts]
    for layer in (0, 1):
        gate_up = written[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = written[f"model.layers.{layer}.mlp.experts.down_proj"]
        for index, source in enumerate(sources):
            gate, up = (
                source[f"model.layers.{layer}.mlp.gate_proj.weight"],
                source[f"model.layers.{layer}.mlp.up_proj.weight"],
            )
            if (layer, index) == (0, 1):
                up = truncate(up, 3, CPU)
            assert torch.equal(gate_up[index], torch.cat([gate, up])), (layer, index)
            assert torch.equal(down[index], source[f"model.layers.{layer}.mlp.down_proj.weight"])


def test_dry_run_shows_each_considered_matrixs_decision(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_laser_config(
        tmp_path / "merge.yaml",
        tiny_models.base,
        list(tiny_models.experts[:2]),
        {0: {"method": "snr", "matrices": ["mlp"], "layers": "last_half", "top_k": 2}},
    )
    result = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output

    source = load_file(tiny_models.experts[0] / "model.safetensors")
    measured = {}
    for part in ("gate_proj", "up_proj", "down_proj"):
        weight = source[f"model.layers.1.mlp.{part}.weight"]
        values = singular_values(weight, CPU)
        threshold = snr_threshold(values, tuple(weight.shape))
        measured[part] = (signal_to_noise(values, threshold), int((values > threshold).sum()))
    lowest = sorted(measured, key=lambda part: measured[part][0])[:2]
    expected = []
    for shape, part in (("128x64", "gate_proj"), ("128x64", "up_proj"), ("64x128", "down_proj")):
        snr, kept = measured[part]
        verdict = f"64 -> {kept}  reduced" if part in lowest else "64 -> 64  not among the 2 lowest-SNR matrices"
        expected.append(f"  {shape:<12} model.layers.1.mlp.{part}.weight  SNR {snr:.4g}  rank {verdict}")
    lines = result.output.splitlines()
    start = lines.index("laser experts[0].laser (method snr, top_k 2): 3 matrices considered, 2 reduced")
    assert lines[start + 1 : start + 4] == expected
    assert not lines[start + 4].startswith("  ")
    assert not (tmp_path / "out").exists()


def test_snr_reduces_only_the_top_k_lowest_snr_matrices(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_laser_config(
        tmp_path / "merge.yaml", tiny_models.base, list(tiny_models.experts[:2]), {0: {"method": "snr", "top_k": 2}}
    )
    results = laser_results(config, tmp_path / "out")
    assert len(results) == 6
    lowest = sorted(results, key=lambda result: result.snr)[:2]
    source = load_file(tiny_models.experts[0] / "model.safetensors")
    for result in results:
        if result in lowest:
            values = singular_values(source[result.tensor], CPU)
            expected_rank = int((values > snr_threshold(values, tuple(source[result.tensor].shape))).sum())
            assert (result.reduced, result.rank_after) == (True, expected_rank)
            assert result.rank_after < result.rank_before == 64
        else:
            assert (result.reduced, result.rank_after) == (False, 64)
            assert result.note == "not among the 2 lowest-SNR matrices"


@pytest.fixture(scope="module")
def memorising_expert(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune of the base whose MLPs learnt the calibration text, so cutting them to rank 1 hurts."""
    folder = write_toy_model(tmp_path_factory.mktemp("trained") / "expert", mlp_seed=5)
    token_ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(CALIBRATION_TEXT)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    mlp_weights = [weight for name, weight in model.named_parameters() if ".mlp." in name]
    for weight in mlp_weights:
        weight.requires_grad_(True)
    optimiser = torch.optim.Adam(mlp_weights, lr=1e-2)
    for _ in range(10):
        loss = model(token_ids, labels=token_ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    state = model.state_dict()
    names = read_header(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file({name: state[name].contiguous() for name in names}, folder / "model.safetensors", {"format": "pt"})
    return folder


def test_calibration_rejects_reductions_that_raise_perplexity(
    tiny_models: TinyModels, memorising_expert: Path, tmp_path: Path
) -> None:
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION_TEXT)
    laser = {"method": "fixed", "matrices": ["mlp"], "keep_fraction": 0.02}
    experts = [memorising_expert, tiny_models.experts[0]]

    unchecked = laser_results(
        write_laser_config(tmp_path / "a.yaml", tiny_models.base, experts, {0: laser}), tmp_path / "a"
    )
    assert [(result.reduced, result.rank_after) for result in unchecked] == [(True, 1)] * 6

    checked_config = write_laser_config(
        tmp_path / "b.yaml", tiny_models.base, experts, {0: {**laser, "calibration": str(calibration)}}
    )
    checked = laser_results(checked_config, tmp_path / "b")
    assert [(result.reduced, result.rank_after) for result in checked] == [(False, 64)] * 6

    # The streamed perplexity is the one transformers computes for the same tokens.
    token_ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_models.base)(CALIBRATION_TEXT)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(memorising_expert, dtype=torch.float32)
    with torch.no_grad():
        perplexity = math.exp(float(model(token_ids, labels=token_ids).loss))
    for result in checked:
        assert result.note.startswith(f"rejected: calibration perplexity would rise from {perplexity:.4g} to ")
        assert float(result.note.rsplit(" ", 1)[1]) > perplexity


# The calibration check's decoder


def streamed_logits(folder: Path, tokens: torch.Tensor, overrides: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the streamed decoder, with `overrides` in layer 1, as the calibration check runs it."""
    source = load_source(str(folder))
    decoder = StreamedDecoder(source.config, source.tensors)
    hidden = [decoder.embed(tokens)]
    for layer in range(decoder.num_layers):
        hidden = decoder.forward_layer(layer, hidden, overrides=overrides if layer == 1 else None).hidden
    return decoder.logits(hidden[0])


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_the_streamed_decoder_with_reduced_matrices_computes_what_transformers_does(
    model_type: str, tmp_path: Path
) -> None:
    folder = write_toy_model(tmp_path / model_type, model_type=model_type, weight_std=0.2)
    tokens = torch.tensor(AutoTokenizer.from_pretrained(folder)(CALIBRATION_TEXT)["input_ids"])
    weights = load_file(folder / "model.safetensors")
    reduced = {
        name: truncate(weights[f"model.layers.1.{name}"], 4, CPU)
        for name in ("mlp.up_proj.weight", "self_attn.q_proj.weight")
    }
    logits = streamed_logits(folder, tokens, reduced)

    model = reference_model(folder)
    with torch.no_grad():
        for name, value in reduced.items():
            model.get_parameter(f"model.layers.1.{name}").copy_(value)
        expected = model(tokens[None]).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # The reductions count, and only for the call they were given to.
    assert not torch.allclose(logits, streamed_logits(folder, tokens, {}), rtol=1e-3, atol=1e-3)


def test_an_override_the_decoder_would_not_use_is_refused(tiny_models: TinyModels) -> None:
    source = load_source(str(tiny_models.base))
    decoder = StreamedDecoder(source.config, source.tensors)
    hidden = [decoder.embed(torch.tensor([1, 2, 3]))]
    with pytest.raises(ModelError, match=r"Cannot override model.layers.0.mlp.up_proj: it is not a weight"):
        decoder.forward_layer(0, hidden, overrides={"mlp.up_proj": torch.zeros(128, 64)})
    with pytest.raises(ModelError, match=r"has shape \(64, 128\), but the weight it replaces has shape \(128, 64\)"):
        decoder.forward_layer(0, hidden, overrides={"mlp.up_proj.weight": torch.zeros(64, 128)})
