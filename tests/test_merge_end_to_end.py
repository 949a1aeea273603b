"""`frankenmoe merge` end to end: configs in, Mixtral checkpoints out, checked against transformers itself.

Each checkpoint variant is merged once per module (see `Checkpoints`) and shared by the tests that
inspect it; the models are the tiny session fixtures from conftest.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MistralForCausalLM, MixtralForCausalLM

from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.sources.model import load_source
from tests.conftest import TinyModels
from tests.support import run_cli, write_config

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
VARIANTS = (*GATE_MODES, "fused", "llama_tied", "sharded_source")
"""Checkpoints every loading test covers; `hidden_scaled` (a fixed router scale) is built for the gate tests."""
PARTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
LAYERS = 2
TEXT = "The quick brown fox jumps over the lazy dog"


def merge(config: Path, out: Path, *options: str) -> Path:
    result = run_cli("merge", config, out, *options)
    assert result.exit_code == 0, result.output
    return out


def add_negative_prompts(config: Path) -> None:
    """Give the first two experts negative prompts, so prompt-based gates subtract something."""
    data = yaml.safe_load(config.read_text())
    data["experts"][0]["negative_prompts"] = ["once upon a time there was a dragon"]
    data["experts"][1]["negative_prompts"] = ["def main(): return 0", "what is 3 plus 4"]
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def write_sharded_copy(source: Path, target: Path) -> Path:
    """The same model with its tensors split over two safetensors files and an index."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(source / "model.safetensors")
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    halves["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    for shard, shard_names in halves.items():
        save_file({name: tensors[name] for name in shard_names}, target / shard, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())},
        "weight_map": {name: shard for shard, shard_names in halves.items() for name in shard_names},
    }
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


def build_checkpoint(models: TinyModels, variant: str, folder: Path) -> Path:
    """Merge one variant into `folder`/out; the config is `folder`/config.yaml."""
    folder.mkdir(parents=True)
    base, experts = models.base, list(models.experts)
    options: list[str] = []
    if variant == "fused":
        options = ["--layout", "fused"]
    elif variant == "llama_tied":
        base, experts = models.llama_tied, list(models.llama_tied_experts)
    elif variant == "sharded_source":
        base = write_sharded_copy(models.base, folder / "sharded-base")
        experts[0] = write_sharded_copy(models.experts[0], folder / "sharded-expert1")
    gate_mode = variant if variant in GATE_MODES else "hidden"
    fixed_scale = {"router": {"scale": 2.5}} if variant == "hidden_scaled" else {}
    config = write_config(folder / "config.yaml", base, experts, gate_mode=gate_mode, **fixed_scale)
    add_negative_prompts(config)
    return merge(config, folder / "out", *options)


@dataclass
class Checkpoints:
    """Merged checkpoints, each built on first use and shared by the module's tests."""

    models: TinyModels
    root: Path
    built: dict[str, Path] = field(default_factory=dict)

    def get(self, variant: str) -> Path:
        if variant not in self.built:
            self.built[variant] = build_checkpoint(self.models, variant, self.root / variant)
        return self.built[variant]

    def config(self, variant: str) -> dict[str, Any]:
        self.get(variant)
        return yaml.safe_load((self.root / variant / "config.yaml").read_text())


@pytest.fixture(scope="module")
def checkpoints(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tiny_models, tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def dense_base(tiny_models: TinyModels) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(tiny_models.base, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_models: TinyModels) -> Any:
    return AutoTokenizer.from_pretrained(tiny_models.base)


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so equality means bit-identical (signed zeros and NaNs included)."""
    return tensor.contiguous().view(torch.uint8)


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    assert torch.equal(bits(actual), bits(expected)), f"{name} differs from its source"


def load_moe(folder: Path) -> MixtralForCausalLM:
    model, info = MixtralForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert info["error_msgs"] == []
    return model.eval()


def all_files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, except the build record: it records the run itself (timings, peak RSS, paths)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads_in_transformers_and_generates(checkpoints: Checkpoints, tokenizer: Any, variant: str) -> None:
    folder = checkpoints.get(variant)
    model = load_moe(folder)
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids

    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=4, do_sample=False)
        logits = model(input_ids).logits

    expert_count = 2 if variant == "llama_tied" else 3
    assert model.config.num_local_experts == expert_count
    assert model.config.num_experts_per_tok == 2
    assert generated.shape == (1, input_ids.shape[1] + 4)
    assert torch.equal(generated[:, : input_ids.shape[1]], input_ids)
    assert torch.isfinite(logits).all()
    assert (folder / "tokenizer.model").is_file()
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert (folder / "README.md").is_file()


def test_tied_embedding_base_gives_a_tied_checkpoint(checkpoints: Checkpoints, tiny_models: TinyModels) -> None:
    folder = checkpoints.get("llama_tied")
    model = load_moe(folder)
    source_embeddings = load_file(tiny_models.llama_tied / "model.safetensors")["model.embed_tokens.weight"]

    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint_tensors(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, source_embeddings)


def test_sharded_source_models_merge_like_single_file_ones(checkpoints: Checkpoints) -> None:
    sharded_base = load_source(str(checkpoints.root / "sharded_source" / "sharded-base"))
    from_shards = checkpoint_tensors(checkpoints.get("sharded_source"))
    from_single_files = checkpoint_tensors(checkpoints.get("hidden"))

    assert len({location.file for location in sharded_base.tensors.values()}) == 2
    assert from_shards.keys() == from_single_files.keys()
    for name, tensor in from_shards.items():
        assert_bit_identical(tensor, from_single_files[name], name)


@pytest.mark.parametrize("experts_per_token", [1, 2])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_moe_of_copies_of_the_base_computes_the_base_logits(
    tiny_models: TinyModels,
    dense_base: MistralForCausalLM,
    tokenizer: Any,
    tmp_path: Path,
    gate_mode: str,
    experts_per_token: int,
) -> None:
    config = write_config(
        tmp_path / "identity.yaml",
        tiny_models.base,
        [tiny_models.base] * 3,
        gate_mode=gate_mode,
        experts_per_token=experts_per_token,
    )
    moe = load_moe(merge(config, tmp_path / "out"))
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids

    with torch.no_grad():
        moe_logits = moe(input_ids).logits
        dense_logits = dense_base(input_ids).logits

    assert moe.config.num_experts_per_tok == experts_per_token
    assert dense_logits.abs().max() > 1e-3
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["hidden", "random"])
def test_experts_are_bit_identical_to_their_source_mlps_in_config_order(
    checkpoints: Checkpoints, tiny_models: TinyModels, variant: str
) -> None:
    output = checkpoint_tensors(checkpoints.get(variant))
    experts = [load_file(folder / "model.safetensors") for folder in tiny_models.experts]

    for layer in range(LAYERS):
        for index, source in enumerate(experts):
            for w, part in PARTS.items():
                name = f"model.layers.{layer}.block_sparse_moe.experts.{index}.{w}.weight"
                assert_bit_identical(output[name], source[f"model.layers.{layer}.mlp.{part}.weight"], name)


def test_every_non_expert_tensor_is_bit_identical_to_the_base(
    checkpoints: Checkpoints, tiny_models: TinyModels
) -> None:
    output = checkpoint_tensors(checkpoints.get("hidden"))
    base = load_file(tiny_models.base / "model.safetensors")
    copied = {name for name in output if "block_sparse_moe" not in name}

    assert copied == {name for name in base if ".mlp." not in name}
    for name in copied:
        assert_bit_identical(output[name], base[name], name)
    assert len([name for name in output if name.endswith("block_sparse_moe.gate.weight")]) == LAYERS


def test_fused_layout_stacks_the_same_expert_weights(checkpoints: Checkpoints, tiny_models: TinyModels) -> None:
    output = checkpoint_tensors(checkpoints.get("fused"))
    classic = checkpoint_tensors(checkpoints.get("hidden"))
    experts = [load_file(folder / "model.safetensors") for folder in tiny_models.experts]

    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        gate_up, down = output[prefix + "mlp.experts.gate_up_proj"], output[prefix + "mlp.experts.down_proj"]
        for index, source in enumerate(experts):
            expected_gate_up = torch.cat(
                [source[prefix + "mlp.gate_proj.weight"], source[prefix + "mlp.up_proj.weight"]]
            )
            assert_bit_identical(gate_up[index], expected_gate_up, f"{prefix} gate_up_proj[{index}]")
            assert_bit_identical(down[index], source[prefix + "mlp.down_proj.weight"], f"{prefix} down_proj[{index}]")
        assert_bit_identical(
            output[prefix + "mlp.gate.weight"], classic[prefix + "block_sparse_moe.gate.weight"], prefix
        )


def test_dtype_change_casts_every_tensor_like_torch_does(
    tiny_models: TinyModels, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "bf16.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")
    folder = merge(config, tmp_path / "out", "--dtype", "bfloat16")
    output = checkpoint_tensors(folder)
    float32_output = checkpoint_tensors(checkpoints.get("random"))
    base = load_file(tiny_models.base / "model.safetensors")
    experts = [load_file(path / "model.safetensors") for path in tiny_models.experts]

    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, tensor in output.items():
        if ".experts." in name:
            layer, index, w = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            source = experts[index][f"model.layers.{layer}.mlp.{PARTS[w]}.weight"]
        elif name.endswith("gate.weight"):
            source = float32_output[name]
        else:
            source = base[name]
        assert_bit_identical(tensor, source.to(torch.bfloat16), name)
    assert load_moe(folder).config.num_local_experts == 3


@pytest.fixture(scope="module")
def transformed_runs(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Expert 0 with residual_scale, expert 1 with noise_scale, expert 2 plain: twice with seed 3, once with 4."""
    root = tmp_path_factory.mktemp("transformed")
    config = write_config(root / "config.yaml", tiny_models.base, tiny_models.experts, gate_mode="random")
    data = yaml.safe_load(config.read_text())
    data["experts"][0]["residual_scale"] = 0.7
    data["experts"][1]["noise_scale"] = 0.01
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return {
        "seed3": merge(config, root / "seed3", "--seed", "3"),
        "seed3-again": merge(config, root / "seed3-again", "--seed", "3"),
        "seed4": merge(config, root / "seed4", "--seed", "4"),
    }


def expert_mlp_names(index: int) -> Iterator[tuple[str, str]]:
    """(output name, source name) of every MLP tensor of expert `index`."""
    for layer in range(LAYERS):
        for w, part in PARTS.items():
            yield (
                f"model.layers.{layer}.block_sparse_moe.experts.{index}.{w}.weight",
                f"model.layers.{layer}.mlp.{part}.weight",
            )


def test_noise_scale_adds_seeded_noise_of_that_size_to_that_expert_only(
    transformed_runs: dict[str, Path], tiny_models: TinyModels
) -> None:
    run, rerun, other_seed = (checkpoint_tensors(transformed_runs[key]) for key in ("seed3", "seed3-again", "seed4"))
    noisy_source = load_file(tiny_models.experts[1] / "model.safetensors")
    plain_source = load_file(tiny_models.experts[2] / "model.safetensors")
    base = load_file(tiny_models.base / "model.safetensors")

    for output_name, source_name in expert_mlp_names(1):
        noise = run[output_name] - noisy_source[source_name]
        assert abs(noise.std().item() - 0.01) < 0.001, output_name
        assert abs(noise.mean().item()) < 0.001, output_name
        assert torch.equal(run[output_name], rerun[output_name])
        assert not torch.equal(run[output_name], other_seed[output_name])
    for output_name, source_name in expert_mlp_names(2):
        assert_bit_identical(run[output_name], plain_source[source_name], output_name)
    for name in (name for name in run if "block_sparse_moe" not in name):
        assert_bit_identical(run[name], base[name], name)


def test_residual_scale_multiplies_down_proj_exactly(
    transformed_runs: dict[str, Path], tiny_models: TinyModels
) -> None:
    output = checkpoint_tensors(transformed_runs["seed3"])
    source = load_file(tiny_models.experts[0] / "model.safetensors")

    for output_name, source_name in expert_mlp_names(0):
        expected = source[source_name] * 0.7 if source_name.endswith("down_proj.weight") else source[source_name]
        assert_bit_identical(output[output_name], expected, output_name)


def test_same_seed_writes_byte_identical_files(transformed_runs: dict[str, Path]) -> None:
    first, second = all_files(transformed_runs["seed3"]), all_files(transformed_runs["seed3-again"])

    assert "model-00001-of-00001.safetensors" in first
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_hidden_merge_is_reproducible_byte_for_byte(
    checkpoints: Checkpoints, tiny_models: TinyModels, tmp_path: Path
) -> None:
    again = build_checkpoint(tiny_models, "hidden", tmp_path / "hidden")

    assert all_files(again) == all_files(checkpoints.get("hidden"))


def router_inputs_from_transformers(model: MistralForCausalLM, tokenizer: Any, text: str) -> list[torch.Tensor]:
    """Each layer's router input for `text` at its non-special tokens, [tokens, hidden] per layer."""
    encoded = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    content = encoded["special_tokens_mask"][0] == 0
    captured: list[torch.Tensor] = []
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[0])
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(encoded["input_ids"])
    finally:
        for hook in hooks:
            hook.remove()
    assert not content.all(), "the tokenizer should mark BOS as special"
    return [states[content] for states in captured]


def prompt_texts(config: dict[str, Any]) -> list[str]:
    """Every prompt of every expert in config order, positives before negatives, repeats kept."""
    return [
        text for expert in config["experts"] for text in expert["positive_prompts"] + expert.get("negative_prompts", [])
    ]


def expected_rows(config: dict[str, Any], vector: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Rows per expert: mean of positive prompt vectors minus mean of negative ones, unit length."""
    rows = []
    for expert in config["experts"]:
        row = torch.stack([vector(text) for text in expert["positive_prompts"]]).mean(dim=0)
        if expert.get("negative_prompts"):
            row = row - torch.stack([vector(text) for text in expert["negative_prompts"]]).mean(dim=0)
        rows.append(row / row.norm())
    return torch.stack(rows)


def hidden_unit_rows(
    config: dict[str, Any], model: MistralForCausalLM, tokenizer: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the unit gate rows from transformers' router inputs, and every prompt token's router input.

    The rows are centred as `router.center` (default) does: orthogonal to the mean prompt token."""
    states = {text: router_inputs_from_transformers(model, tokenizer, text) for text in set(prompt_texts(config))}
    tokens = [torch.cat([states[text][layer] for text in prompt_texts(config)]) for layer in range(LAYERS)]
    rows = []
    for layer in range(LAYERS):
        uncentred = expected_rows(config, lambda text, layer=layer: states[text][layer].mean(dim=0))
        mean_token = tokens[layer].mean(dim=0) / tokens[layer].mean(dim=0).norm()
        centred = uncentred - (uncentred @ mean_token).unsqueeze(-1) * mean_token
        rows.append(centred / centred.norm(dim=-1, keepdim=True))
    return rows, tokens


def test_hidden_gates_with_a_fixed_scale_are_unit_rows_from_transformers_router_inputs_times_the_scale(
    checkpoints: Checkpoints, dense_base: MistralForCausalLM, tokenizer: Any
) -> None:
    config = checkpoints.config("hidden_scaled")
    output = checkpoint_tensors(checkpoints.get("hidden_scaled"))
    unit_rows, _ = hidden_unit_rows(config, dense_base, tokenizer)

    assert config["router"]["scale"] == 2.5
    assert any(expert.get("negative_prompts") for expert in config["experts"])
    for layer in range(LAYERS):
        gate = output[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate, 2.5 * unit_rows[layer], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unit_rows[0], unit_rows[1], atol=1e-3)


def test_hidden_gates_with_auto_scale_spread_the_prompt_logits_to_logit_std(
    checkpoints: Checkpoints, dense_base: MistralForCausalLM, tokenizer: Any
) -> None:
    """The default `router.scale` (auto) multiplies each layer's unit rows by one factor, chosen so the
    prompts' own router logits have a mean standard deviation across experts of `router.logit_std` (1.0)."""
    config = checkpoints.config("hidden")
    output = checkpoint_tensors(checkpoints.get("hidden"))
    unit_rows, prompt_tokens = hidden_unit_rows(config, dense_base, tokenizer)

    for layer in range(LAYERS):
        gate = output[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate / gate.norm(dim=1, keepdim=True), unit_rows[layer], atol=1e-5, rtol=1e-4)
        spread = (prompt_tokens[layer] @ unit_rows[layer].T).std(dim=-1, unbiased=False).mean()
        torch.testing.assert_close(gate, unit_rows[layer] / spread, atol=1e-5, rtol=1e-4)
        logits = prompt_tokens[layer] @ gate.T
        assert abs(logits.std(dim=-1, unbiased=False).mean().item() - 1.0) < 1e-4


def test_cheap_embed_gates_pool_the_embedding_table_the_same_way(
    checkpoints: Checkpoints, tiny_models: TinyModels, tokenizer: Any
) -> None:
    config = checkpoints.config("cheap_embed")
    output = checkpoint_tensors(checkpoints.get("cheap_embed"))
    table = load_file(tiny_models.base / "model.safetensors")["model.embed_tokens.weight"]

    def embedded(text: str) -> torch.Tensor:
        encoded = tokenizer(text, return_special_tokens_mask=True)
        ids = torch.tensor(encoded["input_ids"])[torch.tensor(encoded["special_tokens_mask"]) == 0]
        return table[ids].mean(dim=0)

    expected = expected_rows(config, embedded)
    for layer in range(LAYERS):
        torch.testing.assert_close(
            output[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected, atol=1e-6, rtol=1e-5
        )


def test_random_gates_depend_on_the_seed_only(transformed_runs: dict[str, Path], checkpoints: Checkpoints) -> None:
    name = "model.layers.0.block_sparse_moe.gate.weight"
    seed3, seed4 = (checkpoint_tensors(transformed_runs[key])[name] for key in ("seed3", "seed4"))

    assert not torch.equal(seed3, seed4)
    assert torch.equal(seed3, checkpoint_tensors(transformed_runs["seed3-again"])[name])
    uniform = checkpoint_tensors(checkpoints.get("uniform_random"))[name]
    assert uniform.abs().max() <= 1 / 64**0.5


def test_dry_run_writes_nothing(tiny_models: TinyModels, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_models.base, tiny_models.experts)
    before = sorted(tmp_path.rglob("*"))

    result = run_cli("merge", config, tmp_path / "out", "--dry-run")

    assert result.exit_code == 0, result.output
    assert "Dry run: nothing was written." in result.output
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in result.output
    assert "computed router: gate mode hidden" in result.output
    assert not (tmp_path / "out").exists()
    assert sorted(tmp_path.rglob("*")) == before


def test_small_shard_size_writes_several_loadable_shards_with_the_same_tensors(
    checkpoints: Checkpoints, tiny_models: TinyModels, tmp_path: Path
) -> None:
    config = checkpoints.root / "hidden" / "config.yaml"
    folder = merge(config, tmp_path / "out", "--shard-size", "100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*.safetensors"))
    sharded, single = checkpoint_tensors(folder), checkpoint_tensors(checkpoints.get("hidden"))

    assert len(shards) > 2
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert all(shard.name.endswith(f"-of-{len(shards):05d}.safetensors") for shard in shards)
    assert index["metadata"]["total_size"] == sum(tensor.numel() * tensor.element_size() for tensor in sharded.values())
    assert sharded.keys() == single.keys()
    for name, tensor in sharded.items():
        assert_bit_identical(tensor, single[name], name)
    load_moe(folder)
