"""--stream-sources: Hub sources' tensors read over HTTP range requests straight into the writer.

The server and its fixtures are tests/test_hub_sources.py's (tests/hub_server.py on 127.0.0.1, an empty
Hugging Face cache per test). Also here: the Hub paths that module leaves out (a pickle-only repo,
`model+adapter` with both parts on the Hub, a disk that fills up mid-download).
"""

from __future__ import annotations

import errno
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

import frankenmoe.io.remote
import frankenmoe.sources.hub
from frankenmoe.io.remote import RemoteFile
from frankenmoe.io.safetensors import TensorLocation
from frankenmoe.io.shards import ShardEntry, ShardWriter
from frankenmoe.testing.toymodels import write_toy_model
from tests import test_hub_sources
from tests.hub_server import HubServer
from tests.support import run_cli
from tests.test_hub_sources import BASE_ID, BEYONDER_CONFIG, EXPERT_IDS, config_with

# The server and an empty cache per test, pointed at by huggingface_hub (test_hub_sources.py's fixtures).
repos = test_hub_sources.repos
hub = test_hub_sources.hub


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frankenmoe.io.remote, "BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(frankenmoe.sources.hub, "BACKOFF_SECONDS", 0.0)


def cache_repo(tmp_path: Path, repo_id: str) -> Path:
    """The repo's folder in the test's Hugging Face cache (the hub fixture's HF_HUB_CACHE)."""
    return tmp_path / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"


def cached_weight_bytes(tmp_path: Path, repo_id: str) -> int:
    """Bytes of the repo's weight files in the cache, partial downloads included: its LFS blobs, which the
    cache names after their sha256 (64 hex digits; small files' blobs have git's 40-digit ids)."""
    blobs = cache_repo(tmp_path, repo_id) / "blobs"
    found = blobs.iterdir() if blobs.is_dir() else ()
    return sum(blob.stat().st_size for blob in found if len(blob.name.removesuffix(".incomplete")) == 64)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.safetensors"))}


def test_a_streamed_merge_is_byte_identical_to_the_downloaded_one_and_stores_no_expert_weight(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed = tmp_path / "streamed"

    result = run_cli("merge", BEYONDER_CONFIG, streamed, "--stream-sources")

    assert result.exit_code == 0, result.output
    size = (hub.repos[EXPERT_IDS[0]].folder / "model.safetensors").stat().st_size
    for repo_id in EXPERT_IDS:
        assert cached_weight_bytes(tmp_path, repo_id) == 0, "nothing of an expert's weights is stored"
        snapshot = cache_repo(tmp_path, repo_id) / "snapshots" / hub.repos[repo_id].revisions["main"]
        assert sorted(path.name for path in snapshot.iterdir()) == ["config.json"]
        ranges = [request.range for request in hub.requests_for(repo_id) if request.method == "GET" and request.range]
        assert all(not byte_range.startswith("bytes=0-") or byte_range == "bytes=0-99999" for byte_range in ranges)
    # gate_mode hidden runs prompts through the base: it is downloaded, as without streaming.
    assert cached_weight_bytes(tmp_path, BASE_ID) >= size

    # The same merge downloading its sources, into a cache of its own.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "other" / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other" / "hf" / "hub"))
    downloaded = tmp_path / "downloaded"
    assert run_cli("merge", BEYONDER_CONFIG, downloaded).exit_code == 0
    assert cached_weight_bytes(tmp_path / "other", EXPERT_IDS[0]) >= size
    assert shard_bytes(streamed) == shard_bytes(downloaded)
    for name in ("config.json", "model.safetensors.index.json"):
        assert (streamed / name).read_bytes() == (downloaded / name).read_bytes()


def test_with_random_gates_even_the_base_is_streamed_and_the_cache_holds_no_weight(
    hub: HubServer, tmp_path: Path
) -> None:
    config = config_with(tmp_path, ("experts:", "gate_mode: random\nexperts:"))
    out = tmp_path / "out"

    dry = run_cli("merge", config, out, "--stream-sources", "--dry-run")
    result = run_cli("merge", config, out, "--stream-sources", "--no-check")

    assert dry.exit_code == 0, dry.output
    assert "downloads: none" in dry.output
    assert "streamed over HTTP, not stored: 5 file(s)" in dry.output
    assert result.exit_code == 0, result.output
    assert all(cached_weight_bytes(tmp_path, repo_id) == 0 for repo_id in (BASE_ID, *EXPERT_IDS))
    output = load_file(next(out.glob("model-*.safetensors")))
    base = load_file(hub.repos[BASE_ID].folder / "model.safetensors")
    assert torch.equal(output["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])


def test_the_dry_run_says_what_would_be_streamed_and_reads_no_tensor_byte(hub: HubServer, tmp_path: Path) -> None:
    result = run_cli("merge", BEYONDER_CONFIG, tmp_path / "out", "--stream-sources", "--dry-run")

    assert result.exit_code == 0, result.output
    size = (hub.repos[BASE_ID].folder / "model.safetensors").stat().st_size
    assert f"downloads: 1 file(s), {size / 1e9:.2f} GB in total" in result.output
    assert "streamed over HTTP, not stored: 4 file(s)" in result.output
    for repo_id in EXPERT_IDS:
        assert f"{repo_id}@{hub.repos[repo_id].revisions['main'][:12]} model.safetensors (" in result.output
    assert not [request for request in hub.log if request.range and not request.range.startswith("bytes=0-")]
    assert not (tmp_path / "out").exists()


def test_a_dropped_connection_and_a_503_are_retried_from_the_byte_where_they_stopped(
    hub: HubServer, repos: dict[str, Path], tmp_path: Path
) -> None:
    expert = EXPERT_IDS[2]
    hub.faults[f"{expert}/model.safetensors"] = ["drop", "503", "drop"]
    out = tmp_path / "out"

    result = run_cli("merge", BEYONDER_CONFIG, out, "--stream-sources", "--no-check")

    assert result.exit_code == 0, result.output
    assert hub.faults[f"{expert}/model.safetensors"] == []
    source = load_file(repos[expert] / "model.safetensors")
    output = load_file(next(out.glob("model-*.safetensors")))
    for layer in (0, 1):
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            name = f"model.layers.{layer}.block_sparse_moe.experts.2.{ours}.weight"
            assert torch.equal(output[name], source[f"model.layers.{layer}.mlp.{theirs}.weight"])
    # After a drop, the next request asks for the rest of the range only: its start is past the first one's.
    ranges = [
        request.range
        for request in hub.requests_for(expert)
        if request.path.endswith("model.safetensors") and request.range not in (None, "bytes=0-99999")
    ]
    first_start, first_end = (int(part) for part in ranges[0].removeprefix("bytes=").split("-"))
    resumed_start, resumed_end = (int(part) for part in ranges[1].removeprefix("bytes=").split("-"))
    assert first_start < resumed_start <= first_end and resumed_end == first_end


def test_a_source_that_keeps_failing_is_a_model_error_naming_it_with_nothing_in_out(
    hub: HubServer, tmp_path: Path
) -> None:
    expert = EXPERT_IDS[1]
    hub.faults[f"{expert}/model.safetensors"] = ["503"] * frankenmoe.io.remote.STREAM_ATTEMPTS
    out = tmp_path / "out"

    result = run_cli("merge", BEYONDER_CONFIG, out, "--stream-sources", "--no-check")

    assert result.exit_code == 3
    message = " ".join(result.output.split())
    assert f"Streaming model.safetensors of Hub repo {expert}" in message and "HTTP 503" in message
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]


def test_a_source_whose_commit_changes_mid_merge_is_an_error_naming_it_and_out_stays_empty(
    hub: HubServer, repos: dict[str, Path], tmp_path: Path
) -> None:
    expert = EXPERT_IDS[3]
    new_commit = hub.move(expert, repos[EXPERT_IDS[0]], after_requests=2)
    out = tmp_path / "out"

    result = run_cli("merge", BEYONDER_CONFIG, out, "--stream-sources", "--no-check")

    assert result.exit_code == 3
    message = " ".join(result.output.split())
    assert f"Hub repo {expert} changed while the merge was streaming it" in message
    assert f"answered with commit {new_commit}" in message
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]


def test_a_streamed_copy_holds_a_few_chunks_in_memory_whatever_the_tensor_size(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 48 MiB tensor goes through the writer in 1 MiB chunks: Python's peak allocation stays far below it."""
    monkeypatch.setattr(frankenmoe.io.remote, "STREAM_CHUNK_BYTES", 1024 * 1024)
    size = 48 * 1024 * 1024
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    payload = os.urandom(size)
    (folder / "model.safetensors").write_bytes(payload)
    commit = hub.add("someone/big", folder)
    remote = RemoteFile("someone/big", commit, "model.safetensors", size, "someone/big")
    location = TensorLocation("w", tmp_path / "absent" / "model.safetensors", "U8", (size,), 0, size, remote=remote)
    writer = ShardWriter(tmp_path / "out.safetensors", [ShardEntry("w", "U8", (size,))], {})

    tracemalloc.start()
    try:
        writer.begin("w")
        writer.copy_bytes(location)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    writer.close()

    assert peak < 24 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held for a {size / 2**20:.0f} MiB tensor"
    written = (tmp_path / "out.safetensors").read_bytes()
    assert written.endswith(payload)


def test_a_repo_with_only_pickle_weights_is_fetched_as_pickles_and_merged(
    hub: HubServer, repos: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "pickle-repo"
    folder.mkdir()
    source = repos[EXPERT_IDS[1]]
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    weights = load_file(source / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "README.md").write_text("# pickles only\n")
    hub.add("someone/pickle-only", folder)
    config = config_with(tmp_path, (EXPERT_IDS[1], "someone/pickle-only"))
    out = tmp_path / "out"

    result = run_cli("merge", config, out, "--no-check")

    assert result.exit_code == 0, result.output
    assert {name for name in hub.downloaded_files() if name.startswith("someone/")} == {
        "someone/pickle-only/config.json",
        "someone/pickle-only/pytorch_model.bin",
    }
    output = load_file(next(out.glob("model-*.safetensors")))
    assert torch.equal(
        output["model.layers.1.block_sparse_moe.experts.1.w2.weight"], weights["model.layers.1.mlp.down_proj.weight"]
    )


def test_model_plus_adapter_with_both_on_the_hub_merges_the_adapted_expert(
    hub: HubServer, repos: dict[str, Path], tmp_path: Path
) -> None:
    from tests.test_lora import make_adapter

    model = write_toy_model(tmp_path / "llama", model_type="llama")
    adapter = make_adapter(model, tmp_path / "adapter")
    hub.add("someone/llama", test_hub_sources.as_hub_repo(model, tmp_path / "llama-repo"))
    hub.add("someone/llama-lora", adapter.folder)
    config = tmp_path / "lora.yaml"
    data: dict[str, Any] = {
        "base_model": "someone/llama",
        "gate_mode": "random",
        "experts": [{"source_model": "someone/llama+someone/llama-lora"}, {"source_model": "someone/llama"}],
    }
    config.write_text(json.dumps(data))
    out = tmp_path / "out"

    result = run_cli("merge", config, out, "--no-check", "--stream-sources")

    assert result.exit_code == 0, result.output
    output = load_file(next(out.glob("model-*.safetensors")))
    for layer in (0, 1):
        assert torch.equal(
            output[f"model.layers.{layer}.block_sparse_moe.experts.0.w1.weight"],
            adapter.merged[f"model.layers.{layer}.mlp.gate_proj.weight"],
        )
    fetched = hub.downloaded_files()
    assert {name for name in fetched if name.startswith("someone/llama-lora/")} == {
        "someone/llama-lora/adapter_config.json",
        "someone/llama-lora/adapter_model.safetensors",
    }
    assert cached_weight_bytes(tmp_path, "someone/llama") == 0, "the model itself was streamed"


def test_a_disk_that_fills_up_mid_download_is_exit_4_and_the_partial_file_resumes(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the partial file's writes once 1 MB of it is on disk (what a full file system answers)."""
    limit = 1_000_000
    real_open = Path.open

    class FillingFile:
        def __init__(self, handle: Any) -> None:
            self._handle = handle

        def __enter__(self) -> FillingFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.close()

        def write(self, data: bytes) -> int:
            room = limit - self._handle.tell()
            if len(data) > room:
                self._handle.write(data[: max(0, room)])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._handle.write(data)

    def open_filling(path: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(path, mode, *args, **kwargs)
        return FillingFile(handle) if path.name.endswith(".incomplete") else handle

    monkeypatch.setattr(Path, "open", open_filling)
    out = tmp_path / "out"

    full = run_cli("merge", BEYONDER_CONFIG, out)

    assert full.exit_code == 4, full.output
    assert "The disk filled up while downloading model.safetensors" in " ".join(full.output.split())
    assert not out.exists()
    (partial,) = (cache_repo(tmp_path, BASE_ID) / "blobs").glob("*.incomplete")
    assert partial.stat().st_size == limit

    monkeypatch.setattr(Path, "open", real_open)
    hub.log.clear()
    resumed = run_cli("merge", BEYONDER_CONFIG, out, "--no-check")

    assert resumed.exit_code == 0, resumed.output
    base_gets = [request.range for request in hub.requests_for(BASE_ID) if request.path.endswith("model.safetensors")]
    assert f"bytes={limit}-" in base_gets
    assert not partial.exists()
