"""Source models: resolving local folders, indexing tensors from headers, and compatibility checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frankenmoe.errors import ModelError
from frankenmoe.sources.model import ModelShape, check_compatible, load_source
from frankenmoe.sources.resolve import resolve_reference
from frankenmoe.testing.toymodels import SHAPES, ToyShape, write_toy_model
from tests.conftest import TinyModels


def test_local_folder_is_indexed_from_its_headers(tiny_models: TinyModels) -> None:
    base = load_source(str(tiny_models.base))

    assert base.path == tiny_models.base.resolve()
    assert base.model_type == "mistral"
    assert not base.tie_word_embeddings
    assert base.shape == ModelShape(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=32000,
        hidden_act="silu",
    )
    assert set(base.tensors) == set(load_file(tiny_models.base / "model.safetensors"))
    assert set(base.expected_shapes()) == set(base.tensors)
    assert len(base.mlp_tensor_names()) == 2 * 3
    base.check_tensors()


def test_tied_llama_needs_no_lm_head(tiny_models: TinyModels) -> None:
    llama = load_source(str(tiny_models.llama_tied))

    assert llama.model_type == "llama"
    assert llama.tie_word_embeddings
    assert "lm_head.weight" not in llama.tensors
    assert "lm_head.weight" not in llama.expected_shapes()
    llama.check_tensors()


def test_relative_folder_resolves_against_the_current_directory(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_models.base.parent)

    assert resolve_reference("base") == tiny_models.base.resolve()
    assert resolve_reference("./expert1") == tiny_models.experts[0].resolve()


def test_missing_relative_folder_names_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelError) as caught:
        resolve_reference("./no-such-model")

    assert "'./no-such-model'" in caught.value.message
    assert str(tmp_path.resolve() / "no-such-model") in caught.value.message
    assert caught.value.exit_code == 3


def test_fine_tunes_of_the_same_base_are_compatible(tiny_models: TinyModels) -> None:
    base = load_source(str(tiny_models.base))
    for index, folder in enumerate(tiny_models.experts):
        check_compatible(base, load_source(str(folder)), f"experts[{index}]")


@pytest.mark.parametrize(
    ("field", "changed_shape", "expert_value", "base_value"),
    [
        ("intermediate_size", dataclasses.replace(SHAPES["tiny"], intermediate_size=96), 96, 128),
        ("num_hidden_layers", dataclasses.replace(SHAPES["tiny"], num_hidden_layers=3), 3, 2),
        ("num_key_value_heads", dataclasses.replace(SHAPES["tiny"], num_key_value_heads=4), 4, 2),
    ],
)
def test_incompatible_expert_is_named_with_the_field_and_both_values(
    tiny_models: TinyModels, tmp_path: Path, field: str, changed_shape: ToyShape, expert_value: int, base_value: int
) -> None:
    odd = write_toy_model(tmp_path / "odd-one", shape=changed_shape)
    base = load_source(str(tiny_models.base))

    with pytest.raises(ModelError) as caught:
        check_compatible(base, load_source(str(odd)), "experts[1]")

    message = caught.value.message
    assert "experts[1]" in message
    assert str(odd) in message
    assert str(tiny_models.base) in message
    assert f"{field} is {expert_value} in the expert but {base_value} in the base" in message


def test_missing_mlp_tensor_is_named_with_the_model(tiny_models: TinyModels, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_models.experts[0], incomplete)
    tensors = load_file(incomplete / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (incomplete / "model.safetensors").unlink()
    save_file(tensors, incomplete / "model.safetensors", metadata={"format": "pt"})
    expert = load_source(str(incomplete))

    with pytest.raises(ModelError) as caught:
        expert.check_tensors(expert.mlp_tensor_names())

    assert "'model.layers.1.mlp.up_proj.weight'" in caught.value.message
    assert str(incomplete) in caught.value.message
    assert caught.value.exit_code == 3


def test_non_mlp_tensors_are_not_required_of_an_expert(tiny_models: TinyModels, tmp_path: Path) -> None:
    """Experts contribute only their MLPs, so a checkpoint holding just those is enough."""
    mlp_only = tmp_path / "mlp-only"
    shutil.copytree(tiny_models.experts[1], mlp_only)
    tensors = load_file(mlp_only / "model.safetensors")
    (mlp_only / "model.safetensors").unlink()
    save_file({name: tensor for name, tensor in tensors.items() if ".mlp." in name}, mlp_only / "model.safetensors")
    expert = load_source(str(mlp_only))

    expert.check_tensors(expert.mlp_tensor_names())
    with pytest.raises(ModelError, match=r"model\.embed_tokens\.weight"):
        expert.check_tensors()


def test_tensor_in_two_files_without_an_index_is_refused_naming_both(tiny_models: TinyModels, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_models.experts[0], tmp_path / "with-stray-file")
    stale = load_file(folder / "model.safetensors")["model.layers.1.mlp.up_proj.weight"] * 0
    save_file({"model.layers.1.mlp.up_proj.weight": stale}, folder / "model-old.safetensors")

    with pytest.raises(ModelError) as caught:
        load_source(str(folder))

    message = caught.value.message
    assert "tensor 'model.layers.1.mlp.up_proj.weight' in two files" in message
    assert "model-old.safetensors and model.safetensors" in message
    assert "no index file" in message
    assert caught.value.exit_code == 3


def test_the_index_decides_which_copy_of_a_duplicated_tensor_is_read(tiny_models: TinyModels, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_models.experts[0], tmp_path / "indexed")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: tensors[name]}, folder / "model-00002-of-00002.safetensors")
    weight_map = dict.fromkeys(tensors, "model-00001-of-00002.safetensors") | {name: "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    model = load_source(str(folder))

    assert model.tensors[name].file.name == "model-00002-of-00002.safetensors"
    assert model.tensors["model.norm.weight"].file.name == "model-00001-of-00002.safetensors"


def _adapter_files(folder: Path, weights_name: str) -> None:
    """A PEFT LoRA adapter's files: its config and its A/B matrices."""
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    lora = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64)}
    if weights_name.endswith(".safetensors"):
        save_file(lora, folder / weights_name)
    else:
        torch.save(lora, folder / weights_name)


def test_pickle_weights_next_to_an_adapter_are_read_and_the_adapter_is_not(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    folder = shutil.copytree(
        tiny_models.experts[0], tmp_path / "bin-and-adapter", ignore=shutil.ignore_patterns("*.safetensors")
    )
    torch.save(load_file(tiny_models.experts[0] / "model.safetensors"), folder / "pytorch_model.bin")
    _adapter_files(folder, "adapter_model.safetensors")

    model = load_source(str(folder))

    assert {location.file.name for location in model.tensors.values()} == {"pytorch_model.bin"}
    model.check_tensors()


@pytest.mark.parametrize("weights_name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_adapter_without_model_weights_is_named_as_an_adapter(
    tiny_models: TinyModels, tmp_path: Path, weights_name: str
) -> None:
    folder = shutil.copytree(
        tiny_models.experts[0], tmp_path / "adapter", ignore=shutil.ignore_patterns("*.safetensors")
    )
    _adapter_files(folder, weights_name)

    with pytest.raises(ModelError) as caught:
        load_source(str(folder))

    assert f"({folder}) is a PEFT adapter (adapter_config.json)" in caught.value.message
    assert "not a model's weights" in caught.value.message
