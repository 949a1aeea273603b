"""Source models: resolving local folders, indexing tensors from headers, and compatibility checks."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from frankenmoe.errors import ModelError
from frankenmoe.sources import ModelShape, check_compatible, load_source, resolve_reference
from frankenmoe.toymodels import SHAPES, ToyShape, write_toy_model
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
