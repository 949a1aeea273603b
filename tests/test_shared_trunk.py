"""`shared_weights`: the non-expert tensors merged from the base and the experts while streaming.

References are computed here with plain torch on the whole tensors; the merge computes them row block
by row block from the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import frankenmoe
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import run_cli

SHAPE = ToyShape(
    hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
SHARED_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, two full fine-tunes of it (every weight moved), and an MLP-only fine-tune."""
    root = tmp_path_factory.mktemp("trunk")
    base = write_toy_model(root / "base", shape=SHAPE, base_seed=1)
    made = {"base": base, "mlp_only": write_toy_model(root / "mlp-only", shape=SHAPE, base_seed=1, mlp_seed=5)}
    base_tensors = load_file(base / "model.safetensors")
    for index in (1, 2):
        folder = write_toy_model(root / f"full{index}", shape=SHAPE, base_seed=1, mlp_seed=10 + index)
        tensors = load_file(folder / "model.safetensors")
        generator = torch.Generator().manual_seed(index)
        moved = {
            name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()
        }
        assert moved.keys() == base_tensors.keys()
        save_file(moved, folder / "model.safetensors", {"format": "pt"})
        made[f"full{index}"] = folder
    return made


def merge(tmp_path: Path, sources: dict[str, Path], experts: list[str], out: str = "out", **config: Any) -> Path:
    data = {
        "base_model": str(sources["base"]),
        "gate_mode": config.pop("gate_mode", "random"),
        "experts_per_token": 1,
        "experts": [{"source_model": str(sources[name]), "positive_prompts": [f"topic {name}"]} for name in experts],
        **config,
    }
    return frankenmoe.merge(data, tmp_path / out, check_routing=False, **config.pop("options", {})).out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def test_a_linear_average_of_identical_sources_equals_the_base_bit_for_bit_after_the_cast(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    data = {
        "base_model": str(sources["base"]),
        "gate_mode": "random",
        "experts_per_token": 1,
        "dtype": "bfloat16",
        "shared_weights": {"method": "linear", "weights": [0.3, 0.7], "base_weight": 2.0},
        "experts": [{"source_model": str(sources["base"])}, {"source_model": str(sources["mlp_only"])}],
    }
    written = tensors(frankenmoe.merge(data, tmp_path / "out", check_routing=False).out)
    base = load_file(sources["base"] / "model.safetensors")

    for name in SHARED_NAMES:
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], base[name].to(torch.bfloat16)), name


def reference(
    method: str, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], **options: Any
) -> torch.Tensor:
    deltas = [expert - base for expert in experts]
    if method == "linear":
        total = options["base_weight"] * base + sum(w * e for w, e in zip(weights, experts, strict=True))
        return total / (options["base_weight"] + sum(weights))
    if method == "task_arithmetic":
        return base + options["lambda"] * sum(w * d for w, d in zip(weights, deltas, strict=True))
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    elected = torch.sign(sum(weighted))
    agree = [(torch.sign(d) == elected) & (d != 0) for d in weighted]
    kept = sum(d * a for d, a in zip(weighted, agree, strict=True))
    count = sum(abs(w) * a.float() for w, a in zip(weights, agree, strict=True))
    return base + options["lambda"] * torch.where(count > 0, kept / count.clamp_min(1e-12), torch.zeros_like(kept))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("linear", {"base_weight": 0.5}),
        ("task_arithmetic", {"lambda": 0.7}),
        ("dare_ties", {"lambda": 1.0, "density": 1.0}),
    ],
)
def test_each_method_equals_a_plain_torch_reference(
    tmp_path: Path, sources: dict[str, Path], method: str, options: dict[str, float]
) -> None:
    weights = [0.6, 1.4]
    config = {"method": method, "weights": weights, **options}
    written = tensors(merge(tmp_path, sources, ["full1", "full2"], shared_weights=config))
    base = load_file(sources["base"] / "model.safetensors")
    experts = [load_file(sources[name] / "model.safetensors") for name in ("full1", "full2")]

    for name in SHARED_NAMES:
        expected = reference(method, base[name], [expert[name] for expert in experts], weights, **options)
        torch.testing.assert_close(written[name], expected, rtol=0, atol=2e-7, msg=name)


def test_seeded_dare_is_reproducible_and_drops_about_one_minus_density(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    config = {"method": "dare_linear", "density": 0.25}
    first = tensors(merge(tmp_path, sources, ["full1", "full2"], "a", shared_weights=config))
    again = tensors(merge(tmp_path, sources, ["full1", "full2"], "b", shared_weights=config))
    other_seed = frankenmoe.merge(
        {
            "base_model": str(sources["base"]),
            "gate_mode": "random",
            "experts_per_token": 1,
            "shared_weights": config,
            "experts": [{"source_model": str(sources["full1"])}, {"source_model": str(sources["full2"])}],
        },
        tmp_path / "c",
        seed=9,
        check_routing=False,
    )
    reseeded = tensors(other_seed.out)
    name = "model.layers.1.self_attn.q_proj.weight"

    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first[name], reseeded[name])
    base = load_file(sources["base"] / "model.safetensors")[name]
    one_expert = tensors(merge(tmp_path, sources, ["full1"], "d", shared_weights=config))[name]
    kept = (one_expert != base).float().mean().item()
    assert 0.2 < kept < 0.3


def test_the_hidden_state_pass_runs_on_the_merged_trunk(tmp_path: Path, sources: dict[str, Path]) -> None:
    config = {"method": "task_arithmetic", "lambda": 0.5}
    merged = merge(tmp_path, sources, ["full1", "full2"], "merged", gate_mode="hidden", shared_weights=config)
    # The dense model whose attention, norms and embeddings are the merged trunk, and whose MLP is the base's.
    dense = tmp_path / "merged-dense"
    dense.mkdir()
    for item in sources["base"].iterdir():
        if item.name != "model.safetensors":
            (dense / item.name).write_bytes(item.read_bytes())
    written = tensors(merged)
    base = load_file(sources["base"] / "model.safetensors")
    save_file({name: written.get(name, tensor) for name, tensor in base.items()}, dense / "model.safetensors")
    sources_with_dense = {**sources, "base": dense}
    from_dense = tensors(merge(tmp_path, sources_with_dense, ["full1", "full2"], "from-dense", gate_mode="hidden"))
    from_base = tensors(merge(tmp_path, sources, ["full1", "full2"], "from-base", gate_mode="hidden"))
    router = "model.layers.1.block_sparse_moe.gate.weight"

    assert torch.equal(written[router], from_dense[router])
    assert not torch.equal(written[router], from_base[router])


def test_the_dry_run_and_the_model_card_say_how_every_shared_tensor_was_made(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    config = tmp_path / "moe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(sources["base"]),
                "gate_mode": "random",
                "experts_per_token": 1,
                "shared_weights": {"method": "dare_ties", "density": 0.5},
                "experts": [{"source_model": str(sources["full1"])}, {"source_model": str(sources["full2"])}],
            }
        )
    )
    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    rows = [line for line in dry.output.splitlines() if "  <-  " in line][1:]
    shared_lines = [line for line in rows if "experts." not in line and "gate.weight" not in line]
    assert shared_lines and all("merged from the base and 2 expert(s): dare_ties" in line for line in shared_lines)
    assert "shared weights: every one of" in dry.output

    assert run_cli("merge", config, tmp_path / "out", "--no-check").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "are a dare_ties merge of the base model" in card and "density 0.5, seeded drop" in card


def test_an_expert_whose_shared_tensor_shape_differs_is_refused(tmp_path: Path, sources: dict[str, Path]) -> None:
    bigger = write_toy_model(
        tmp_path / "added-tokens", shape=ToyShape(**{**SHAPE.__dict__, "vocab_size": 32002}), base_seed=1
    )

    with pytest.raises(frankenmoe.ModelError, match=r"cannot merge 'model.embed_tokens.weight': it is \[32002, 64\]"):
        frankenmoe.plan_merge(
            {
                "base_model": str(sources["base"]),
                "gate_mode": "random",
                "experts_per_token": 1,
                "shared_weights": {"method": "linear"},
                "experts": [{"source_model": str(bigger)}],
            },
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"method": "ties"}, "`shared_weights.method` is 'ties'"),
        ({"method": "linear", "weights": [1.0]}, "has 1 value(s), but there are 2 expert(s)"),
        ({"method": "dare_linear", "density": 0}, "must be in (0, 1]"),
        ({"method": "linear", "weights": [1.0, -2.0]}, "sum to 0"),
    ],
)
def test_bad_shared_weights_blocks_are_config_errors(block: dict[str, Any], message: str) -> None:
    text = yaml.safe_dump(
        {"base_model": "b", "gate_mode": "random", "shared_weights": block, "experts": [{"source_model": "e"}] * 2}
    )
    with pytest.raises(frankenmoe.ConfigError) as caught:
        frankenmoe.load_config(text)
    assert message in caught.value.message


def test_base_laser_with_a_merged_trunk_is_refused() -> None:
    text = yaml.safe_dump(
        {
            "base_model": "b",
            "gate_mode": "random",
            "shared_weights": {"method": "linear"},
            "base_laser": {"method": "snr", "matrices": ["attention"]},
            "experts_per_token": 1,
            "experts": [{"source_model": "e"}],
        }
    )
    with pytest.raises(frankenmoe.ConfigError, match="Use one of them"):
        frankenmoe.load_config(text)


def test_the_manifest_and_config_record_a_merged_trunk(tmp_path: Path, sources: dict[str, Path]) -> None:
    out = merge(tmp_path, sources, ["full1", "full2"], shared_weights={"method": "linear"})
    manifest = json.loads((out / "frankenmoe-manifest.json").read_text())
    assert yaml.safe_load(manifest["config"])["shared_weights"] == {"method": "linear"}
