"""Repo ids fetched on demand from a Hub: checked remotely first, then only what the merge reads is downloaded.

A real HTTP server on 127.0.0.1 (tests/hub_server.py) serves tiny models as Hub repos; huggingface_hub
is pointed at it (HF_ENDPOINT) with an empty cache of the test's own (HF_HOME / HF_HUB_CACHE). Each repo
also carries a `pytorch_model.bin` copy, an ONNX file and a README that a merge must never fetch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

import frankenmoe.sources.hub
from frankenmoe.checkpoint.manifest import MANIFEST_NAME
from frankenmoe.testing.toymodels import ToyShape, write_toy_model
from tests.conftest import TinyModels
from tests.hub_server import HubServer
from tests.support import run_cli
from tests.test_beyonder_config import BASE_ID, BEYONDER_CONFIG, EXPERT_IDS

TOKENIZER_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}


def as_hub_repo(model: Path, folder: Path) -> Path:
    """`model`'s files (hard links) plus what real repos also carry: a .bin copy, an ONNX export, a README."""
    folder.mkdir(parents=True)
    for file in model.iterdir():
        os.link(file, folder / file.name)
    os.link(model / "model.safetensors", folder / "pytorch_model.bin")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 4096)
    (folder / "README.md").write_text("# a model card\n")
    return folder


@pytest.fixture(scope="module")
def repos(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-repos")
    fourth = write_toy_model(root / "models" / "expert4", mlp_seed=4)
    models = (tiny_models.base, *tiny_models.experts, fourth)
    folders = {
        repo_id: as_hub_repo(model, root / repo_id.replace("/", "--"))
        for repo_id, model in zip((BASE_ID, *EXPERT_IDS), models, strict=True)
    }
    wide = write_toy_model(root / "models" / "wide", shape=ToyShape(hidden_size=96), mlp_seed=9)
    folders["someone/wider-7B"] = as_hub_repo(wide, root / "wider")
    gguf = root / "gguf-only"
    gguf.mkdir()
    (gguf / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (gguf / "model.Q4_K_M.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    folders["someone/model-GGUF"] = gguf
    return folders


@pytest.fixture
def hub(repos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The server, with huggingface_hub pointed at it and at an empty cache, online, without a token.

    huggingface_hub reads its environment at import, so its constants are patched along with the variables.
    """
    server = HubServer()
    for repo_id, folder in repos.items():
        server.add(repo_id, folder)
    with server.start():
        cache = tmp_path / "hf" / "hub"
        settings = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_TOKEN_PATH": str(tmp_path / "hf" / "token"),
            "HF_STORED_TOKENS_PATH": str(tmp_path / "hf" / "stored_tokens"),
        }
        for name, value in settings.items():
            monkeypatch.setattr(huggingface_hub.constants, name, value)
        for name, value in {
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(cache),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield server


def config_with(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = BEYONDER_CONFIG.read_text()
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "beyonder.yaml"
    config.write_text(text)
    return config


def weight_requests(hub: HubServer) -> list[tuple[str, str | None]]:
    """GETs of weight files: (path, Range header); a header read is a Range request of at most 100 kB."""
    return [
        (request.path, request.range)
        for request in hub.log
        if request.method == "GET" and ".safetensors" in request.path
    ]


def full_weight_downloads(hub: HubServer) -> list[str]:
    return [
        path for path, byte_range in weight_requests(hub) if byte_range is None or not byte_range.startswith("bytes=0-")
    ]


def test_beyonder_config_of_hub_ids_merges_with_nothing_in_the_cache(
    hub: HubServer, repos: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"

    result = run_cli("merge", BEYONDER_CONFIG, out)

    assert result.exit_code == 0, result.output
    (shard,) = out.glob("model-*.safetensors")
    output = load_file(shard)
    for index, repo_id in enumerate(EXPERT_IDS):
        source = load_file(repos[repo_id] / "model.safetensors")
        name = f"model.layers.1.block_sparse_moe.experts.{index}.w2.weight"
        assert torch.equal(output[name], source["model.layers.1.mlp.down_proj.weight"])
    # Only what the merge reads: config + weights of every repo, tokenizer files of the base alone.
    base_tokenizer = {f"{BASE_ID}/{name}" for name in TOKENIZER_NAMES if (repos[BASE_ID] / name).is_file()}
    expected = {f"{repo}/{name}" for repo in (BASE_ID, *EXPERT_IDS) for name in ("config.json", "model.safetensors")}
    fetched = hub.downloaded_files()
    assert fetched - {f"{BASE_ID}/generation_config.json"} == expected | base_tokenizer
    assert not any(name.endswith((".bin", ".onnx", "README.md")) for name in fetched)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    commits = {source["reference"]: source["commit"] for source in manifest["sources"]}
    assert commits == {repo: hub.repos[repo].revisions["main"] for repo in (BASE_ID, *EXPERT_IDS)}


def test_dry_run_against_the_hub_lists_the_downloads_and_fetches_no_weight_byte(hub: HubServer, tmp_path: Path) -> None:
    result = run_cli("merge", BEYONDER_CONFIG, tmp_path / "out", "--dry-run")

    assert result.exit_code == 0, result.output
    size = (hub.repos[BASE_ID].folder / "model.safetensors").stat().st_size
    assert f"downloads: 5 file(s), {5 * size / 1e9:.2f} GB in total" in result.output
    for repo_id in (BASE_ID, *EXPERT_IDS):
        assert (
            f"{repo_id}@{hub.repos[repo_id].revisions['main'][:12]} model.safetensors ({size:,} bytes)" in result.output
        )
    assert weight_requests(hub), "the headers are read remotely"
    assert full_weight_downloads(hub) == []
    assert not (tmp_path / "out").exists()


def test_an_incompatible_expert_fails_before_any_weight_is_downloaded(hub: HubServer, tmp_path: Path) -> None:
    config = config_with(tmp_path, ("maywell/PiVoT-0.1-Starling-LM-RP", "someone/wider-7B"))

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 3
    assert "experts[2] (someone/wider-7B) does not match the base model" in result.output
    assert "hidden_size is 96 in the expert but 64 in the base" in result.output
    assert full_weight_downloads(hub) == []
    assert not (tmp_path / "out").exists()


def test_an_interrupted_download_fails_cleanly_and_resumes_on_the_next_run(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frankenmoe.sources.hub, "BACKOFF_SECONDS", 0.0)
    expert = EXPERT_IDS[1]
    cut = 3_000_000
    hub.cut_after[f"{expert}/model.safetensors"] = cut
    out = tmp_path / "out"

    failed = run_cli("merge", BEYONDER_CONFIG, out)

    assert failed.exit_code == 3
    assert expert in failed.output and "An interrupted download resumes on the next run" in failed.output
    assert not out.exists()
    (partial,) = (tmp_path / "hf" / "hub" / f"models--{expert.replace('/', '--')}" / "blobs").glob("*.incomplete")
    assert partial.stat().st_size == cut

    hub.cut_after.clear()
    hub.log.clear()
    resumed = run_cli("merge", BEYONDER_CONFIG, out)

    assert resumed.exit_code == 0, resumed.output
    assert (
        f"/{expert}/resolve/{hub.repos[expert].revisions['main']}/model.safetensors",
        f"bytes={cut}-",
    ) in weight_requests(hub)
    assert not partial.exists()
    output = load_file(next(out.glob("model-*.safetensors")))
    source = load_file(hub.repos[expert].folder / "model.safetensors")
    assert torch.equal(
        output["model.layers.0.block_sparse_moe.experts.1.w1.weight"], source["model.layers.0.mlp.gate_proj.weight"]
    )


def test_offline_mode_uses_the_cache_and_never_touches_the_network(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uncached = run_cli("merge", BEYONDER_CONFIG, tmp_path / "early", "--offline")
    assert uncached.exit_code == 3
    assert f"Model '{BASE_ID}' is not a local folder and is not in the Hugging Face cache" in uncached.output
    assert "offline mode" in uncached.output
    assert hub.log == []

    assert run_cli("merge", BEYONDER_CONFIG, tmp_path / "online").exit_code == 0
    hub.log.clear()
    offline_flag = run_cli("merge", BEYONDER_CONFIG, tmp_path / "offline", "--offline")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    environment = run_cli("merge", BEYONDER_CONFIG, tmp_path / "environment", "--dry-run")

    assert offline_flag.exit_code == 0, offline_flag.output
    assert environment.exit_code == 0, environment.output
    assert hub.log == []
    online = load_file(next((tmp_path / "online").glob("model-*.safetensors")))
    offline = load_file(next((tmp_path / "offline").glob("model-*.safetensors")))
    assert online.keys() == offline.keys() and all(torch.equal(online[name], offline[name]) for name in online)


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_repo_without_a_token_names_the_repo_and_hf_token(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    hub.repos[EXPERT_IDS[3]].gated = status

    refused = run_cli("merge", BEYONDER_CONFIG, tmp_path / "out", "--dry-run")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    with_token = run_cli("merge", BEYONDER_CONFIG, tmp_path / "out", "--dry-run")

    assert refused.exit_code == 3
    assert f"Hub repo {EXPERT_IDS[3]} is gated" in refused.output and "set HF_TOKEN" in refused.output
    assert with_token.exit_code == 0, with_token.output


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        ("someone/no-such-model", "Hub repo someone/no-such-model does not exist on http://127.0.0.1:"),
        (f"{EXPERT_IDS[0]}@no-such-branch", f"Hub repo {EXPERT_IDS[0]} has no revision 'no-such-branch'"),
        ("someone/model-GGUF", "Hub repo someone/model-GGUF has only GGUF (llama.cpp's quantised format) weights"),
    ],
    ids=["missing repo", "wrong revision", "GGUF only"],
)
def test_a_source_the_hub_cannot_give_fails_with_exit_code_3_naming_it(
    hub: HubServer, tmp_path: Path, replacement: str, message: str
) -> None:
    config = config_with(tmp_path, ("WizardLM/WizardMath-7B-V1.1", replacement))

    result = run_cli("merge", config, tmp_path / "out")

    assert result.exit_code == 3
    assert message in " ".join(result.output.split())
    assert full_weight_downloads(hub) == []
    assert not (tmp_path / "out").exists()


def test_a_fresh_process_downloads_from_the_endpoint_in_its_environment(hub: HubServer, tmp_path: Path) -> None:
    """What a user does: set HF_ENDPOINT / HF_HOME and run the command (huggingface_hub reads them at import)."""
    environment = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
    environment.pop("HF_HUB_CACHE")
    command = [sys.executable, "-m", "frankenmoe", "merge", str(BEYONDER_CONFIG), str(tmp_path / "out"), "--no-check"]

    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False, timeout=300)

    assert result.returncode == 0, result.stderr
    snapshot = tmp_path / "home" / "hub" / f"models--{BASE_ID.replace('/', '--')}" / "snapshots"
    assert (snapshot / hub.repos[BASE_ID].revisions["main"] / "model.safetensors").is_file()
