"""NaN and Inf are refused where the merge makes a tensor, and `shared_weights` options that would do nothing
(or make the result meaningless) are refused when the config is read.

The sources are tiny toy Llamas; the merges run through the command, as a user's would.
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
from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.merging.writer import NON_FINITE_CHECK
from frankenmoe.routers import GATE_FUNCTIONS, random_init
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.support import run_cli

MODEL_ERROR = 3
SHAPE = ToyShape(
    hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
)
GATE = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base, a fine-tune with every weight moved, and a fine-tune whose layer-0 gate_proj holds one NaN."""
    root = tmp_path_factory.mktemp("nonfinite")
    base = write_toy_model(root / "base", shape=SHAPE, base_seed=1)
    moved = write_toy_model(root / "moved", shape=SHAPE, base_seed=1, mlp_seed=7)
    tensors = load_file(moved / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    save_file(
        {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator) for name, tensor in tensors.items()},
        moved / "model.safetensors",
        {"format": "pt"},
    )
    with_nan = write_toy_model(root / "with-nan", shape=SHAPE, base_seed=1, mlp_seed=8)
    tensors = load_file(with_nan / "model.safetensors")
    tensors[GATE][0, 0] = float("nan")
    save_file(tensors, with_nan / "model.safetensors", {"format": "pt"})
    return {"base": base, "moved": moved, "with_nan": with_nan}


def write_moe_config(path: Path, base: Path, experts: list[dict[str, Any]], **top_level: Any) -> Path:
    data = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 1, "experts": experts, **top_level}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused_merge(config: Path, out: Path, *options: str) -> str:
    """Run a merge that must be refused as a model error; its one-line message. Nothing may be left behind."""
    result = run_cli("merge", config, out, "--no-check", *options)
    assert result.exit_code == MODEL_ERROR, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [item.name for item in out.parent.iterdir() if item.name.startswith(f".{out.name}")] == []
    return result.stderr.strip().splitlines()[-1]


# --- item 6: NaN and Inf --------------------------------------------------------------------------------------------


def test_a_lora_adapter_with_nan_is_refused_naming_the_expert_tensor_and_the_adapter(
    models: dict[str, Path], tmp_path: Path
) -> None:
    # The case: an adapter whose lora_B holds NaN puts NaN into every column of one row.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"]})
    )
    prefix = "base_model.model.model.layers"
    lora = {
        f"{prefix}.{layer}.mlp.gate_proj.lora_{side}.weight": torch.full(shape, 0.01)
        for layer in range(SHAPE.num_hidden_layers)
        for side, shape in (("A", (2, SHAPE.hidden_size)), ("B", (SHAPE.intermediate_size, 2)))
    }
    lora[f"{prefix}.1.mlp.gate_proj.lora_B.weight"][5, 1] = float("nan")
    save_file(lora, adapter / "adapter_model.safetensors")
    experts = [{"source_model": str(models["base"])}, {"source_model": f"{models['moved']}+{adapter}"}]
    config = write_moe_config(tmp_path / "moe.yaml", models["base"], experts)

    message = refused_merge(config, tmp_path / "out")

    assert message.startswith("model error: Output tensor model.layers.1.block_sparse_moe.experts.1.w1.weight would ")
    assert (
        f"hold {SHAPE.hidden_size} NaN or infinite value(s) of {SHAPE.hidden_size * SHAPE.intermediate_size}" in message
    )
    assert f"plus the LoRA delta from {adapter / 'adapter_model.safetensors'}" in message
    assert "that delta holds NaN or Inf" in message


def test_a_huge_lambda_is_refused_naming_the_merged_trunk_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    experts = [{"source_model": str(models["moved"])}, {"source_model": str(models["moved"])}]
    config = write_moe_config(
        tmp_path / "moe.yaml",
        models["base"],
        experts,
        shared_weights={"method": "task_arithmetic", "lambda": 1e39},
    )

    message = refused_merge(config, tmp_path / "out")

    assert message.startswith("model error: Output tensor model.embed_tokens.weight would hold ")
    assert "merged by shared_weights (task_arithmetic (expert weights 1, 1, lambda 1e+39))" in message
    assert "its values overflow float32" in message
    assert "Use smaller shared_weights.weights or lambda" in message


def test_noise_that_overflows_is_refused_naming_the_noise_scale(models: dict[str, Path], tmp_path: Path) -> None:
    experts = [{"source_model": str(models["base"])}, {"source_model": str(models["moved"]), "noise_scale": 1e39}]
    config = write_moe_config(tmp_path / "moe.yaml", models["base"], experts)

    message = refused_merge(config, tmp_path / "out")

    assert "model error: Output tensor model.layers.0.block_sparse_moe.experts.1.w1.weight would hold " in message
    assert f"source tensor '{GATE}' of {models['moved'] / 'model.safetensors'} after noise_scale 1e+39" in message


def test_a_transformed_source_tensor_that_holds_nan_is_refused_naming_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    experts = [{"source_model": str(models["base"])}, {"source_model": str(models["with_nan"]), "noise_scale": 0.01}]
    config = write_moe_config(tmp_path / "moe.yaml", models["base"], experts)

    message = refused_merge(config, tmp_path / "out")

    assert "hold 1 NaN or infinite value(s)" in message
    assert f"made from source tensor '{GATE}' of {models['with_nan'] / 'model.safetensors'}, which itself" in message


def test_routers_with_nan_are_refused_naming_the_router(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = random_init.random_gates

    def gates_with_nan(request: Any) -> Any:
        gates = real(request)
        gates.router[1, 0, 3] = float("inf")
        return gates

    monkeypatch.setitem(GATE_FUNCTIONS, "random", gates_with_nan)
    experts = [{"source_model": str(models["base"])}, {"source_model": str(models["moved"])}]
    data = {"base_model": str(models["base"]), "gate_mode": "random", "experts_per_token": 1, "experts": experts}

    with pytest.raises(frankenmoe.ModelError) as caught:
        frankenmoe.merge(data, tmp_path / "out", check_routing=False)

    assert caught.value.message.startswith(
        "Output tensor model.layers.1.block_sparse_moe.gate.weight would hold 1 NaN or infinite value(s) of 64: "
        "it is the router computed by gate_mode random."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_in_a_copied_or_converted_tensor_keeps_the_sources_values_and_the_manifest_says_so(
    models: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    experts = [{"source_model": str(models["base"])}, {"source_model": str(models["with_nan"])}]
    config = write_moe_config(tmp_path / "moe.yaml", models["base"], experts, dtype=dtype)
    out = tmp_path / "out"

    result = run_cli("merge", config, out, "--no-check")

    assert result.exit_code == 0, result.output
    written = load_file(out / "model-00001-of-00001.safetensors")["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    source = load_file(models["with_nan"] / "model.safetensors")[GATE]
    assert torch.equal(written.isnan(), source.isnan())
    assert int(written.isnan().sum()) == 1
    assert json.loads((out / MANIFEST_NAME).read_text())["options"]["non_finite_check"] == NON_FINITE_CHECK
    verified = run_cli("verify", out)
    assert verified.exit_code == 0, verified.output
    assert f"note: NaN/Inf: {NON_FINITE_CHECK}" in verified.output
    assert run_cli("verify", out, "--json").output.count(NON_FINITE_CHECK) == 1


# --- item 7: options that do nothing, weight sums that make the result meaningless ----------------------------------


@pytest.mark.parametrize(
    ("block", "key", "method"),
    [
        ({"method": "base", "weights": [1.0, 2.0]}, "weights", "base"),
        ({"method": "base", "density": 0.5}, "density", "base"),
        ({"method": "base", "lambda": 2.0}, "lambda", "base"),
        ({"method": "linear", "lambda": 0.5}, "lambda", "linear"),
        ({"method": "linear", "density": 0.5}, "density", "linear"),
        ({"method": "task_arithmetic", "normalize": False}, "normalize", "task_arithmetic"),
        ({"method": "task_arithmetic", "base_weight": 2.0}, "base_weight", "task_arithmetic"),
        ({"method": "dare_linear", "normalize": True}, "normalize", "dare_linear"),
        ({"weights": [1.0, 1.0]}, "weights", "base"),
    ],
)
def test_a_shared_weights_key_the_method_does_not_read_is_refused(block: dict[str, Any], key: str, method: str) -> None:
    text = yaml.safe_dump(
        {"base_model": "b", "gate_mode": "random", "shared_weights": block, "experts": [{"source_model": "e"}] * 2}
    )

    with pytest.raises(frankenmoe.ConfigError) as caught:
        frankenmoe.load_config(text)

    assert f"`shared_weights.{key}` has no effect with `shared_weights.method: {method}`" in caught.value.message
    assert "Remove the key, or choose the method that uses it" in caught.value.message


@pytest.mark.parametrize(
    ("block", "accepted"),
    [
        ({"method": "linear", "weights": [1.0, 1.0]}, True),
        ({"method": "linear", "base_weight": 2.0, "weights": [-0.5, -0.5]}, True),  # extrapolation, x3
        ({"method": "linear", "base_weight": 0.0, "weights": [1.0, -0.98]}, True),  # (1 + 0.98) / 0.02 = 99
        ({"method": "linear", "base_weight": 0.0, "weights": [1.0, -0.99]}, False),  # 1.99 / 0.01 = 199
        ({"method": "linear", "base_weight": 1.0, "weights": [-0.5, -0.4999999]}, False),  # the 1e-7
        ({"method": "linear", "base_weight": 1.0, "weights": [-0.5, -0.4999999], "normalize": False}, True),
        ({"method": "dare_linear", "weights": [1.0, -1.0]}, True),  # nothing divides by the sum
    ],
)
def test_linear_weights_that_nearly_cancel_are_refused(block: dict[str, Any], accepted: bool) -> None:
    text = yaml.safe_dump(
        {"base_model": "b", "gate_mode": "random", "shared_weights": block, "experts": [{"source_model": "e"}] * 2}
    )

    if accepted:
        assert frankenmoe.load_config(text).shared_weights.method == block["method"]
        return
    with pytest.raises(frankenmoe.ConfigError) as caught:
        frankenmoe.load_config(text)
    assert "`shared_weights` weights (base_weight and weights) sum to " in caught.value.message
    assert "a 1% change of one weight can change the merged tensors by more than" in caught.value.message
    assert "set normalize: false" in caught.value.message
