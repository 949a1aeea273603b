"""A real published frankenMoE config (Beyonder-4x7B-v2), run unchanged against a prepared Hugging Face cache.

Its `org/name` model ids are mapped to tiny local models by laying them out exactly as the Hugging
Face cache does (models--ORG--NAME/{blobs,refs,snapshots}); frankenmoe must find them there without
any network access, and explain how to fetch a model that is not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, MixtralForCausalLM

from frankenmoe.config.constants import DEFAULT_GATE_MODE
from frankenmoe.config.parse import load_config
from frankenmoe.errors import ModelError
from frankenmoe.sources.model import load_source
from frankenmoe.sources.resolve import resolve_reference
from frankenmoe.testing.toymodels import write_toy_model
from tests.conftest import TinyModels
from tests.support import run_cli

REPOSITORY = Path(__file__).resolve().parents[1]
BEYONDER_CONFIG = REPOSITORY / "tests" / "data" / "beyonder-4x7b-v2.yaml"
BEYONDER_SHA256 = "e290b2ba63cb7f53c04683fc893a15d1a1893f3c0d3e16ce4ac2e43481cf4a8d"
"""The published recipe byte for byte, so a reformatted copy cannot pass for it."""
BASE_ID = "mlabonne/Marcoro14-7B-slerp"
EXPERT_IDS = (
    "openchat/openchat-3.5-1210",
    "beowolx/CodeNinja-1.0-OpenChat-7B",
    "maywell/PiVoT-0.1-Starling-LM-RP",
    "WizardLM/WizardMath-7B-V1.1",
)
PARTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def beyonder_config_path() -> Path:
    if not BEYONDER_CONFIG.is_file():
        pytest.fail(
            f"The Beyonder config is missing: expected it at {BEYONDER_CONFIG}. Restore it from git "
            "(tests/data/beyonder-4x7b-v2.yaml is part of the repository)."
        )
    return BEYONDER_CONFIG


def commit_hash(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def add_to_hf_cache(cache: Path, repo_id: str, model_folder: Path, revision: str, ref: str | None) -> Path:
    """Store a model folder as one snapshot of `repo_id`: files in blobs/, symlinks in snapshots/<revision>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(model_folder.iterdir()):
        content = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snapshot


@dataclass(frozen=True)
class HubCache:
    folder: Path
    sources: dict[str, Path]
    """Each cached repo id's local source model (main revision)."""


@pytest.fixture(scope="module")
def hub_cache(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> HubCache:
    root = tmp_path_factory.mktemp("hub")
    fourth_expert = write_toy_model(root / "local" / "expert4", mlp_seed=4)
    sources = dict(zip((BASE_ID, *EXPERT_IDS), (tiny_models.base, *tiny_models.experts, fourth_expert), strict=True))
    cache = root / "cache"
    for repo_id, folder in sources.items():
        add_to_hf_cache(cache, repo_id, folder, commit_hash(repo_id), "main")
    add_to_hf_cache(cache, EXPERT_IDS[0], tiny_models.experts[2], commit_hash("a v2 branch"), "v2")
    return HubCache(cache, sources)


@contextlib.contextmanager
def using_hub_cache(folder: Path) -> Iterator[None]:
    """Point huggingface_hub at `folder`, offline: the env vars for anything that reads them later, and the
    constants they were already read into when huggingface_hub was imported. (Online, a repo id is
    resolved on the Hub first: tests/test_hub_sources.py.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(folder))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture
def cached(hub_cache: HubCache) -> Iterator[HubCache]:
    with using_hub_cache(hub_cache.folder):
        yield hub_cache


@pytest.fixture(scope="module")
def beyonder_checkpoint(hub_cache: HubCache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("beyonder") / "Beyonder-4x7B-v2-tiny"
    with using_hub_cache(hub_cache.folder):
        result = run_cli("merge", beyonder_config_path(), out)
    assert result.exit_code == 0, result.output
    return out


def test_beyonder_config_is_the_published_file_inside_the_repository() -> None:
    # A fresh clone has nothing beside it, so the tests may only read files the repository holds.
    path = beyonder_config_path()

    assert path.resolve().is_relative_to(REPOSITORY)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BEYONDER_SHA256


def test_beyonder_config_parses_and_validates_unchanged() -> None:
    config = load_config(beyonder_config_path())

    assert config.base_model == BASE_ID
    assert tuple(expert.source_model for expert in config.experts) == EXPERT_IDS
    assert config.gate_mode == DEFAULT_GATE_MODE and config.gate_mode_defaulted  # it names no gate_mode
    assert config.experts_per_token == 2
    assert config.dtype is None
    assert config.experts[1].positive_prompts == ("code", "python", "javascript", "programming", "algorithm")
    assert all(expert.negative_prompts == () for expert in config.experts)


def test_repo_ids_resolve_to_their_cached_snapshots(cached: HubCache) -> None:
    for repo_id, folder in cached.sources.items():
        snapshot = resolve_reference(repo_id)
        assert snapshot.name == commit_hash(repo_id)
        assert snapshot.parent.parent.name == "models--" + repo_id.replace("/", "--")
        assert (snapshot / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_revision_suffix_selects_a_branch_or_a_commit(cached: HubCache, tiny_models: TinyModels) -> None:
    repo_id = EXPERT_IDS[0]

    on_branch = load_source(f"{repo_id}@v2")
    by_commit = load_source(f"{repo_id}@{commit_hash(repo_id)}")
    on_main = load_source(repo_id)

    assert on_branch.path.name == commit_hash("a v2 branch")
    assert by_commit.path == on_main.path
    assert on_main.path.name == commit_hash(repo_id)
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(
        load_file(on_branch.tensors[mlp].file)[mlp], load_file(tiny_models.experts[2] / "model.safetensors")[mlp]
    )
    assert torch.equal(
        load_file(on_main.tensors[mlp].file)[mlp], load_file(tiny_models.experts[0] / "model.safetensors")[mlp]
    )


@pytest.mark.parametrize(
    ("reference", "fetch"),
    [
        ("someorg/never-downloaded", "`hf download someorg/never-downloaded`"),
        (f"{EXPERT_IDS[0]}@no-such-branch", f"`hf download {EXPERT_IDS[0]} --revision no-such-branch`"),
    ],
)
def test_model_missing_from_the_cache_explains_how_to_fetch_it(cached: HubCache, reference: str, fetch: str) -> None:
    with pytest.raises(ModelError) as caught:
        load_source(reference)

    message = caught.value.message
    assert f"'{reference}'" in message
    assert str(cached.folder) in message
    assert fetch in message
    assert "offline mode" in message


def test_cli_reports_an_uncached_model_with_exit_code_3(cached: HubCache, tmp_path: Path) -> None:
    config = tmp_path / "beyonder-plus-one.yaml"
    config.write_text(
        beyonder_config_path().read_text().replace("WizardLM/WizardMath-7B-V1.1", "WizardLM/WizardMath-70B")
    )

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 3
    assert "WizardLM/WizardMath-70B" in result.output
    assert "hf download WizardLM/WizardMath-70B" in result.output
    assert not (tmp_path / "out").exists()


def test_beyonder_dry_run_resolves_every_model_and_writes_nothing(cached: HubCache, tmp_path: Path) -> None:
    result = run_cli("merge", beyonder_config_path(), tmp_path / "out", "--dry-run")

    assert result.exit_code == 0, result.output
    assert f"base model: {BASE_ID} (" in result.output
    for index, repo_id in enumerate(EXPERT_IDS):
        assert f"expert {index}: {repo_id} (" in result.output
        assert commit_hash(repo_id) in result.output
    # Beyonder's config names no gate_mode: the dry run says which mode runs and why.
    assert f"gate mode: {DEFAULT_GATE_MODE} (the default: the config names no gate_mode); experts per token: 2" in (
        result.output
    )
    assert "Dry run: nothing was written." in result.output
    assert list(tmp_path.iterdir()) == []


def test_beyonder_merge_loads_in_transformers_with_four_experts(beyonder_checkpoint: Path) -> None:
    model, info = MixtralForCausalLM.from_pretrained(beyonder_checkpoint, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(beyonder_checkpoint)
    input_ids = tokenizer("Write a python function that", return_tensors="pt").input_ids

    with torch.no_grad():
        generated = model.eval().generate(input_ids, max_new_tokens=3, do_sample=False)

    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (4, 2)
    assert generated.shape == (1, input_ids.shape[1] + 3)
    card = (beyonder_checkpoint / "README.md").read_text()
    assert BASE_ID in card
    assert beyonder_config_path().read_text().strip() in card


def test_beyonder_card_header_names_the_hub_sources_as_base_models(beyonder_checkpoint: Path) -> None:
    header = yaml.safe_load((beyonder_checkpoint / "README.md").read_text().split("---\n")[1])

    assert header["base_model"] == [BASE_ID, *EXPERT_IDS]
    assert header["base_model_relation"] == "merge"
    assert {"moe", "frankenmoe", "mixtral", "mistral"} <= set(header["tags"])


def test_beyonder_experts_come_from_the_cached_models_in_config_order(
    beyonder_checkpoint: Path, hub_cache: HubCache
) -> None:
    (shard,) = beyonder_checkpoint.glob("model-*.safetensors")
    output = load_file(shard)
    base = load_file(hub_cache.sources[BASE_ID] / "model.safetensors")

    for index, repo_id in enumerate(EXPERT_IDS):
        source = load_file(hub_cache.sources[repo_id] / "model.safetensors")
        for layer in range(2):
            for w, part in PARTS.items():
                name = f"model.layers.{layer}.block_sparse_moe.experts.{index}.{w}.weight"
                assert torch.equal(output[name], source[f"model.layers.{layer}.mlp.{part}.weight"]), name
    assert all(torch.equal(output[name], tensor) for name, tensor in base.items() if ".mlp." not in name)
    config = json.loads((beyonder_checkpoint / "config.json").read_text())
    assert (config["num_local_experts"], config["torch_dtype"]) == (4, "float32")


def test_a_fresh_process_finds_the_cache_from_the_environment_variable_alone(
    hub_cache: HubCache, tmp_path: Path
) -> None:
    """What a user does: export HF_HUB_CACHE, then run the command (huggingface_hub reads it at import)."""
    environment = {**os.environ, "HF_HUB_CACHE": str(hub_cache.folder), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "frankenmoe", "merge", str(beyonder_config_path()), str(tmp_path / "out")]

    result = subprocess.run([*command, "--dry-run"], env=environment, capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    assert str(hub_cache.folder / ("models--" + BASE_ID.replace("/", "--"))) in result.stdout
    assert not (tmp_path / "out").exists()
