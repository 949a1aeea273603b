"""LoRA adapters as experts (`source_model: model+adapter`), checked against peft's own merge_and_unload.

Every adapter here is made by peft on a tiny Llama, with init_lora_weights=False so that lora_B is not
zero and every delta is real. peft is a test-only dependency: frankenmoe reads the adapter's files itself.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from frankenmoe.architectures.roles import ATTENTION_PROJECTIONS, MLP_PARTS
from frankenmoe.config.parse import parse_config
from frankenmoe.decoder import slices
from frankenmoe.decoder.moe import sliced_mlp
from frankenmoe.decoder.slices import MatrixRows
from frankenmoe.errors import ModelError
from frankenmoe.io.safetensors import read_tensor
from frankenmoe.merging.prepare import load_sources
from frankenmoe.routers.hidden import _mlp_weights
from frankenmoe.sources.model import SourceModel
from frankenmoe.testing.toymodels import SHAPES, write_toy_model
from tests.support import run_cli
from tests.test_beyonder_config import add_to_hf_cache, commit_hash, using_hub_cache

LAYERS = 2
MLP = ["gate_proj", "up_proj", "down_proj"]
MIXTRAL_PARTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass(frozen=True)
class Adapter:
    folder: Path
    merged: dict[str, torch.Tensor]
    """peft's merge_and_unload() of the adapter into its model: every tensor, by checkpoint name."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    narrow = replace(SHAPES["tiny"], intermediate_size=96)
    return {
        "llama": write_toy_model(root / "llama", model_type="llama"),
        "llama_bf16": write_toy_model(root / "llama-bf16", model_type="llama", dtype="bfloat16", base_seed=3),
        "narrow": write_toy_model(root / "narrow", model_type="llama", shape=narrow),
    }


def make_adapter(
    model: Path, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, safe: bool = True, **settings: Any
) -> Adapter:
    """peft's adapter on `model` (saved to `folder`) and the model peft's merge_and_unload makes with it."""
    torch.manual_seed(seed)
    settings.setdefault("target_modules", MLP)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model, dtype=dtype), LoraConfig(init_lora_weights=False, **settings)
    )
    peft_model.save_pretrained(folder, safe_serialization=safe)
    merged = peft_model.merge_and_unload()
    return Adapter(folder, {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()})


def merge(tmp_path: Path, base: Path | str, experts: list[str], *options: str, **top_level: Any) -> Path:
    """Merge with random gates (no prompts needed) and no routing check; the output folder."""
    config = tmp_path / "config.yaml"
    data = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts": [{"source_model": expert} for expert in experts],
        **top_level,
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    result = run_cli("merge", config, out, "--no-check", *options)
    assert result.exit_code == 0, result.output
    return out


def output_tensors(out: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for shard in sorted(out.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def expert_tensor(layer: int, expert: int, part: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_PARTS[part]}.weight"


def mlp_tensor(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def assert_expert_is(tensors: dict[str, torch.Tensor], expert: int, expected: dict[str, torch.Tensor]) -> None:
    for layer in range(LAYERS):
        for part in MLP_PARTS:
            assert torch.equal(tensors[expert_tensor(layer, expert, part)], expected[mlp_tensor(layer, part)]), (
                layer,
                part,
            )


def plain_weights(model: Path) -> dict[str, torch.Tensor]:
    return load_file(model / "model.safetensors")


def lora_source(models: dict[str, Path], adapter: Path, label: str = "experts[0]") -> SourceModel:
    config = parse_config(
        yaml.safe_dump(
            {
                "base_model": str(models["llama"]),
                "gate_mode": "random",
                "experts": [{"source_model": f"{models['llama']}+{adapter}"}, {"source_model": str(models["llama"])}],
            }
        )
    )
    return load_sources(config)[1][0]


def test_an_expert_from_model_plus_adapter_is_peft_merge_and_unload_bit_for_bit(
    models: dict[str, Path], tmp_path: Path
) -> None:
    llama = models["llama"]
    first = make_adapter(llama, tmp_path / "first", seed=1, r=4, lora_alpha=8)
    second = make_adapter(llama, tmp_path / "second", seed=2, r=16, lora_alpha=8)
    pickled = make_adapter(llama, tmp_path / "pickled", seed=1, safe=False, r=4, lora_alpha=8)
    assert (pickled.folder / "adapter_model.bin").is_file() and not (
        pickled.folder / "adapter_model.safetensors"
    ).exists()

    out = merge(tmp_path, llama, [f"{llama}+{first.folder}", f"{llama}+{second.folder}", f"{llama}+{pickled.folder}"])

    tensors = output_tensors(out)
    assert_expert_is(tensors, 0, first.merged)
    assert_expert_is(tensors, 1, second.merged)
    assert_expert_is(tensors, 2, first.merged)  # the .bin form of the same adapter, read by the pickle loader
    base = plain_weights(llama)
    assert not torch.equal(tensors[expert_tensor(0, 0, "gate_proj")], base[mlp_tensor(0, "gate_proj")])
    for layer in range(LAYERS):
        for projection in ATTENTION_PROJECTIONS:
            name = f"model.layers.{layer}.self_attn.{projection}.weight"
            assert torch.equal(tensors[name], base[name])


def test_bfloat16_experts_equal_peft_after_the_same_cast(models: dict[str, Path], tmp_path: Path) -> None:
    """W + scale * B @ A in float32, cast once: what peft gives on the bfloat16 model (its LoRA matrices are
    float32, so its in-place sum rounds once) and on the float32 model, cast to bfloat16."""
    model = models["llama_bf16"]
    adapter = make_adapter(model, tmp_path / "adapter", seed=4, dtype=torch.bfloat16, r=8, lora_alpha=16)
    in_float32 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter.folder
    )
    cast = {
        name: tensor.detach().to(torch.bfloat16) for name, tensor in in_float32.merge_and_unload().state_dict().items()
    }

    tensors = output_tensors(merge(tmp_path, model, [f"{model}+{adapter.folder}", str(model)]))

    assert tensors[expert_tensor(0, 0, "up_proj")].dtype == torch.bfloat16
    assert_expert_is(tensors, 0, adapter.merged)
    assert_expert_is(tensors, 0, cast)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"r": 8, "lora_alpha": 16, "use_rslora": True}, id="rslora"),
        pytest.param(
            {
                "r": 4,
                "lora_alpha": 8,
                "rank_pattern": {"layers.1.mlp.gate_proj": 2, "down_proj": 6},
                "alpha_pattern": {r"layers\.0\.mlp\.up_proj": 32},
            },
            id="rank-and-alpha-patterns",
        ),
        pytest.param({"r": 4, "target_modules": r".*\.layers\.1\.mlp\.(gate|down)_proj"}, id="regex-target-modules"),
        pytest.param(
            {"r": 4, "target_modules": ["up_proj", "mlp.down_proj"], "layers_to_transform": [1]},
            id="layers-to-transform",
        ),
        pytest.param({"r": 4, "target_modules": MLP, "exclude_modules": ["model.layers.0.mlp.up_proj"]}, id="exclude"),
    ],
)
def test_peft_settings_give_peft_merge_and_unload_bit_for_bit(
    models: dict[str, Path], tmp_path: Path, settings: dict[str, Any]
) -> None:
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", seed=5, **settings)

    tensors = output_tensors(merge(tmp_path, llama, [f"{llama}+{adapter.folder}", str(llama)]))

    assert_expert_is(tensors, 0, adapter.merged)
    assert_expert_is(tensors, 1, plain_weights(llama))


def test_ranks_and_scales_follow_the_patterns_and_rslora(models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    patterned = make_adapter(
        llama,
        tmp_path / "patterned",
        r=4,
        lora_alpha=8,
        rank_pattern={"layers.1.mlp.gate_proj": 2},
        alpha_pattern={"down_proj": 32},
    )
    rslora = make_adapter(llama, tmp_path / "rslora", r=16, lora_alpha=8, use_rslora=True)

    deltas = lora_source(models, patterned.folder).adapter.deltas  # type: ignore[union-attr]
    assert (deltas[mlp_tensor(1, "gate_proj")].rank, deltas[mlp_tensor(1, "gate_proj")].scale) == (2, 4.0)
    assert (deltas[mlp_tensor(0, "gate_proj")].rank, deltas[mlp_tensor(0, "gate_proj")].scale) == (4, 2.0)
    assert deltas[mlp_tensor(0, "down_proj")].scale == 8.0
    assert {delta.scale for delta in lora_source(models, rslora.folder).adapter.deltas.values()} == {2.0}  # type: ignore[union-attr]


def test_a_shared_expert_given_as_model_plus_adapter(models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", seed=6, r=4, lora_alpha=4)

    out = merge(
        tmp_path,
        llama,
        [str(llama), str(llama)],
        architecture="qwen2_moe",
        shared_experts=[{"source_model": f"{llama}+{adapter.folder}"}],
    )

    tensors = output_tensors(out)
    for layer in range(LAYERS):
        for part in MLP_PARTS:
            shared = tensors[f"model.layers.{layer}.mlp.shared_expert.{part}.weight"]
            assert torch.equal(shared, adapter.merged[mlp_tensor(layer, part)])
            assert torch.equal(
                tensors[f"model.layers.{layer}.mlp.experts.0.{part}.weight"],
                plain_weights(llama)[mlp_tensor(layer, part)],
            )
    assert "| shared | `" in (out / "README.md").read_text()


def test_attention_and_embeddings_are_left_out_with_a_warning_per_kind_and_a_card_record(
    models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    llama = models["llama"]
    adapter = make_adapter(
        llama,
        tmp_path / "adapter",
        seed=7,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens", "gate_proj"],
    )

    with caplog.at_level(logging.WARNING, logger="frankenmoe"):
        out = merge(tmp_path, llama, [f"{llama}+{adapter.folder}", str(llama)])

    warnings = [record.getMessage() for record in caplog.records if "also adapts" in record.getMessage()]
    assert len(warnings) == 2
    assert "also adapts attention (q_proj, v_proj: 4 matrices)" in warnings[0]
    assert "comes from the base model" in warnings[0]
    assert "also adapts embeddings (embed_tokens: 1 matrix)" in warnings[1]
    tensors = output_tensors(out)
    base = plain_weights(llama)
    for layer in range(LAYERS):
        assert torch.equal(
            tensors[expert_tensor(layer, 0, "gate_proj")], adapter.merged[mlp_tensor(layer, "gate_proj")]
        )
        assert torch.equal(tensors[expert_tensor(layer, 0, "up_proj")], base[mlp_tensor(layer, "up_proj")])
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert torch.equal(tensors[name], base[name]) and not torch.equal(adapter.merged[name], base[name])
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    card = (out / "README.md").read_text()
    assert "## LoRA adapters" in card
    section = card.split("## LoRA adapters", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| 0 | `"))
    assert "| 4 | 2 | 2 |" in row
    assert "attention (q_proj, v_proj: 4 matrices); embeddings (embed_tokens: 1 matrix)" in row


def test_the_dry_run_names_each_adapter_with_rank_and_scale(models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", r=8, lora_alpha=32)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(llama),
                "gate_mode": "random",
                "experts": [{"source_model": f"{llama}+{adapter.folder}"}, {"source_model": str(llama)}],
            }
        )
    )

    result = run_cli("merge", config, tmp_path / "out", "--dry-run")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        f"expert 0: {llama}+{adapter.folder} ({llama}); LoRA {adapter.folder}: rank 8, scale 4; 6 MLP matrices" in lines
    )
    assert f"expert 1: {llama} ({llama})" in lines


def test_experts_sharing_a_model_share_its_headers(models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    first = make_adapter(llama, tmp_path / "first", seed=1, r=4)
    second = make_adapter(llama, tmp_path / "second", seed=2, r=4)
    config = parse_config(
        yaml.safe_dump(
            {
                "base_model": str(llama),
                "gate_mode": "random",
                "experts": [{"source_model": f"{llama}+{first.folder}"}, {"source_model": f"{llama}+{second.folder}"}],
            }
        )
    )

    base, experts, _ = load_sources(config)

    assert experts[0].tensors is base.tensors and experts[1].tensors is base.tensors
    assert experts[0].adapter is not None and experts[1].adapter is not None
    assert experts[0].adapter.path != experts[1].adapter.path


def test_hugging_face_cache_ids_on_both_sides_of_the_plus(models: dict[str, Path], tmp_path: Path) -> None:
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", r=4, lora_alpha=8)
    cache = tmp_path / "cache"
    add_to_hf_cache(cache, "org/tiny-llama", llama, commit_hash("base"), "main")
    add_to_hf_cache(cache, "org/tiny-llama-lora", adapter.folder, commit_hash("adapter"), "main")

    with using_hub_cache(cache):
        out = merge(tmp_path, "org/tiny-llama", ["org/tiny-llama+org/tiny-llama-lora", "org/tiny-llama"])

    assert_expert_is(output_tensors(out), 0, adapter.merged)


def test_forward_passes_see_the_adapted_matrices_slice_by_slice(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What router.sequential runs for an expert (hidden._mlp_weights) is the MLP of peft's merged model."""
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", seed=8, r=4, lora_alpha=16)
    source = lora_source(models, adapter.folder)
    monkeypatch.setattr(slices, "SLICE_BYTES", 10 * 64 * 4)  # 10-row slices: every matrix in several
    merged_model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    merged_model.load_state_dict(adapter.merged)
    tokens = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))

    weights = _mlp_weights(source, 1, None)

    gate = weights.gate_proj
    assert isinstance(gate, MatrixRows) and gate.lora is not None and len(gate.slice_starts) > 1
    rows = torch.cat([gate.read(start, torch.device("cpu")) for start in gate.slice_starts])
    torch.testing.assert_close(rows, adapter.merged[mlp_tensor(1, "gate_proj")])
    activation = merged_model.model.layers[1].mlp.act_fn
    with torch.no_grad():
        expected = merged_model.model.layers[1].mlp(tokens)
    torch.testing.assert_close(sliced_mlp(tokens, weights, activation), expected)
    assert not torch.allclose(rows, read_tensor(source.tensor(mlp_tensor(1, "gate_proj"))))


def test_router_sequential_routes_on_the_adapted_experts(models: dict[str, Path], tmp_path: Path) -> None:
    """The merge completes with router.sequential over adapter experts, and its rows differ from the
    base model's states after layer 0, as the experts' adapted MLPs make them."""
    llama = models["llama"]
    adapters = [make_adapter(llama, tmp_path / f"adapter{index}", seed=index, r=4, lora_alpha=64) for index in (1, 2)]
    experts = [
        {"source_model": f"{llama}+{adapter.folder}", "positive_prompts": [prompt]}
        for adapter, prompt in zip(adapters, ("red blue green", "seven eight nine"), strict=True)
    ]

    def rows(sequential: bool, folder: str) -> torch.Tensor:
        config = tmp_path / f"{folder}.yaml"
        data = {"base_model": str(llama), "dtype": "float32", "experts": experts, "router": {"sequential": sequential}}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        result = run_cli("merge", config, tmp_path / folder, "--no-check")
        assert result.exit_code == 0, result.output
        return output_tensors(tmp_path / folder)["model.layers.1.block_sparse_moe.gate.weight"]

    assert not torch.allclose(rows(True, "sequential"), rows(False, "base-states"), atol=1e-4)


def edited_adapter(source: Adapter, folder: Path, **changes: Any) -> Path:
    shutil.copytree(source.folder, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def plain_adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    return make_adapter(models["llama"], tmp_path_factory.mktemp("plain") / "adapter", r=4, lora_alpha=8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora is set: DoRA rescales every merged column by a trained magnitude vector"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save is set: it carries fully trained copies of ['lm_head']"),
        ({"bias": "all"}, 'bias is "all": it trained biases'),
        ({"bias": "lora_only"}, 'bias is "lora_only"'),
        ({"peft_type": "LOHA"}, "it is a LOHA adapter (peft_type), and frankenmoe merges LoRA adapters only"),
        ({"init_lora_weights": "pissa"}, 'init_lora_weights is "pissa", which also changes the base weights'),
        (
            {"use_bdlora": {"nblocks": 2}},
            "it sets use_bdlora ({'nblocks': 2}), a LoRA variant frankenmoe does not implement",
        ),
    ],
)
def test_unsupported_adapters_are_refused_with_the_reason(
    models: dict[str, Path], plain_adapter: Adapter, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    folder = edited_adapter(plain_adapter, tmp_path / "edited", **changes)

    with pytest.raises(ModelError, match=re.escape(message)) as refused:
        lora_source(models, folder)

    assert "experts[0]" in refused.value.message and "merge_and_unload()" in refused.value.message


def test_an_adapter_for_another_shape_is_refused_before_any_work_with_both_shapes(
    models: dict[str, Path], tmp_path: Path
) -> None:
    adapter = make_adapter(models["narrow"], tmp_path / "narrow-adapter", r=4)
    config = tmp_path / "config.yaml"
    llama = models["llama"]
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(llama),
                "gate_mode": "random",
                "experts": [{"source_model": f"{llama}+{adapter.folder}"}, {"source_model": str(llama)}],
            }
        )
    )

    result = run_cli("merge", config, tmp_path / "out", "--no-check")

    assert result.exit_code == 3
    message = " ".join(result.output.split())
    assert (
        "does not fit its model: for model.layers.0.mlp.down_proj, lora_A has shape [4, 96] and lora_B [64, 4]"
        in message
    )
    assert "the model's weight is [64, 128]" in message and "needs lora_A [4, 128] and lora_B [64, 4]" in message
    assert not (tmp_path / "out").exists()


def test_missing_adapter_folders_and_folders_without_a_config_are_clear(
    models: dict[str, Path], plain_adapter: Adapter, tmp_path: Path
) -> None:
    with pytest.raises(
        ModelError, match=r"The LoRA adapter '.*nowhere' of experts\[0\] .* cannot be found: Model folder"
    ):
        lora_source(models, tmp_path / "nowhere")
    not_an_adapter = tmp_path / "weights-only"
    not_an_adapter.mkdir()
    shutil.copy(plain_adapter.folder / "adapter_model.safetensors", not_an_adapter)
    with pytest.raises(ModelError, match=r"has no adapter_config.json, so it is not a PEFT adapter"):
        lora_source(models, not_an_adapter)
    without_weights = edited_adapter(plain_adapter, tmp_path / "config-only")
    (without_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(
        ModelError, match=r"has adapter_config.json but no adapter_model.safetensors or adapter_model.bin"
    ):
        lora_source(models, without_weights)


def test_a_base_model_with_an_adapter_and_a_laser_on_adapted_matrices_are_refused(
    models: dict[str, Path], plain_adapter: Adapter, tmp_path: Path
) -> None:
    llama = models["llama"]
    config = parse_config(
        yaml.safe_dump(
            {
                "base_model": f"{llama}+{plain_adapter.folder}",
                "gate_mode": "random",
                "experts": [{"source_model": str(llama)}, {"source_model": str(llama)}],
            }
        )
    )
    with pytest.raises(
        ModelError, match=r"names a LoRA adapter \(`model\+adapter`\), but the base model gives the MoE"
    ):
        load_sources(config)

    laser_config = tmp_path / "laser.yaml"
    laser_config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(llama),
                "gate_mode": "random",
                "experts": [
                    {"source_model": f"{llama}+{plain_adapter.folder}", "laser": {"method": "snr", "layers": [0]}},
                    {"source_model": str(llama)},
                ],
            }
        )
    )
    result = run_cli("merge", laser_config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 2
    assert "which its LoRA adapter changes; laser analyses a model's matrices without the adapter" in " ".join(
        result.output.split()
    )


def test_the_build_record_fingerprints_the_adapter_so_an_edited_adapter_rebuilds(
    models: dict[str, Path], tmp_path: Path
) -> None:
    llama = models["llama"]
    adapter = make_adapter(llama, tmp_path / "adapter", seed=4, r=4, lora_alpha=8)
    config = tmp_path / "variant.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(llama),
                "gate_mode": "random",
                "experts_per_token": 1,
                "experts": [{"source_model": str(llama)}, {"source_model": f"{llama}+{adapter.folder}"}],
            }
        )
    )
    builds = tmp_path / "builds"
    assert run_cli("build", config, "--out-dir", builds, "--no-check").exit_code == 0
    manifest = json.loads((builds / "variant" / "frankenmoe-manifest.json").read_text())
    recorded = [file["name"] for file in manifest["sources"][2]["adapter_files"]]
    assert recorded == ["adapter_model.safetensors", "adapter_config.json"]

    make_adapter(llama, adapter.folder, seed=5, r=4, lora_alpha=8)
    rebuilt = run_cli("build", config, "--out-dir", builds, "--no-check")
    assert rebuilt.exit_code == 0 and "a source model's files changed" in rebuilt.output
