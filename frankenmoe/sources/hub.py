"""Source models named by Hugging Face repo id, checked remotely and fetched on demand.

A repo id (`org/name` or `org/name@revision`) is resolved once to a commit. Its config.json (and
index) are fetched into the real Hugging Face cache, its safetensors headers are read over HTTP range
requests, and every pre-flight check runs on that, before any weight byte is downloaded. Once the
plan is known, only the weight files holding tensors the merge reads are downloaded (`download`),
with huggingface_hub's client: its cache layout, HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT, and
its resume of an interrupted transfer (the `.incomplete` blob it leaves is continued next time).

Offline (`--offline`, or HF_HUB_OFFLINE=1) nothing here runs: repo ids are looked up in the cache only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from frankenmoe.errors import ModelError, OutputError
from frankenmoe.io.remote import RemoteFile, hub_errors, split_repo_reference
from frankenmoe.io.safetensors import INDEX_NAME, MAX_HEADER_BYTES, TensorLocation, WeightFormat, parse_header
from frankenmoe.sources.files import ADAPTER_CONFIG, CONFIG_FILE, PICKLE_INDEX_FILE, WEIGHT_PICKLE_PATTERNS

if TYPE_CHECKING:
    pass

logger = logging.getLogger("frankenmoe")

UNMERGEABLE_WEIGHTS = {"*.gguf": "GGUF (llama.cpp's quantised format)", "*.onnx": "ONNX", "*.h5": "TensorFlow"}
HEADER_PREFETCH_BYTES = 100_000
"""Bytes asked for in the first range request: most headers fit, so one request usually reads one."""

_offline: contextvars.ContextVar[bool] = contextvars.ContextVar("frankenmoe_offline", default=False)


def is_offline() -> bool:
    """--offline in this context, or HF_HUB_OFFLINE as huggingface_hub read it (or as set since)."""
    from huggingface_hub import constants

    from_environment = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return _offline.get() or constants.is_offline_mode() or from_environment


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Within this block, repo ids are looked up in the local cache only (the CLI's --offline)."""
    token = _offline.set(enabled or _offline.get())
    try:
        yield
    finally:
        _offline.reset(token)


@dataclass(frozen=True)
class HubRepo:
    """One repo at one commit: its files on the Hub and where the cache keeps that commit's snapshot."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, int]
    """Every file of the commit with its size in bytes."""
    folder: Path
    weight_format: WeightFormat
    weight_files: tuple[str, ...]
    """The files this repo's weights are read from (safetensors shards, or pickles when it has none)."""

    @property
    def reference(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"

    def cached(self, name: str) -> bool:
        """Whether the cache holds this commit's file complete."""
        path = self.folder / name
        return path.is_file() and path.stat().st_size == self.files.get(name, -1)


@dataclass(frozen=True)
class Download:
    """One file the merge reads that the cache does not hold yet."""

    repo: HubRepo
    name: str
    size: int


def resolve(reference: str) -> HubRepo:
    """Resolve `org/name[@revision]` to a commit, list its files, and fetch its small metadata files.

    Fetched now: config.json and the weights index, or an adapter's config and matrices (small). A repo
    whose weights are pickles has them downloaded now too, since a pickle's tensor list is inside it.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    repo_id, revision = split_repo_reference(reference)
    with hub_errors(reference):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    files = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or ()}
    commit = str(info.sha)
    repo_folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    weight_format, weight_files = _choose_weights(reference, files)
    repo = HubRepo(repo_id, revision, commit, files, repo_folder / "snapshots" / commit, weight_format, weight_files)
    if revision != commit:
        # What `hf download` records, so that an offline run later finds this commit under the branch name.
        (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
        (repo_folder / "refs" / revision).write_text(commit)
    small = [CONFIG_FILE, INDEX_NAME if weight_format == "safetensors" else PICKLE_INDEX_FILE, ADAPTER_CONFIG]
    if not weight_files and ADAPTER_CONFIG in files:
        adapter_weights = [name for name in ("adapter_model.safetensors", "adapter_model.bin") if name in files]
        small.extend(adapter_weights[:1])
    if weight_format == "pickle":
        small.extend(weight_files)
    fetch(repo, [name for name in small if name in files], show_progress=False)
    return repo


def _choose_weights(reference: str, files: dict[str, int]) -> tuple[WeightFormat, tuple[str, ...]]:
    """The repo's safetensors weights if it has any, else its pickle weights; refuses GGUF-only repos."""
    top_level = [name for name in files if "/" not in name and not name.startswith("adapter_model.")]
    safetensors = tuple(sorted(fnmatch.filter(top_level, "*.safetensors")))
    if safetensors:
        return "safetensors", safetensors
    for patterns in WEIGHT_PICKLE_PATTERNS:
        pickles = tuple(sorted({name for pattern in patterns for name in fnmatch.filter(top_level, pattern)}))
        if pickles:
            return "pickle", pickles
    if ADAPTER_CONFIG in files:
        return "safetensors", ()  # an adapter repo: lora.py reads it, and refuses it as a model
    for pattern, kind in UNMERGEABLE_WEIGHTS.items():
        found = sorted(fnmatch.filter(files, pattern))
        if found:
            raise ModelError(
                f"Hub repo {reference} has only {kind} weights ({', '.join(found[:3])}"
                f"{' ...' if len(found) > 3 else ''}), which frankenmoe cannot merge: it needs the model's "
                "*.safetensors (or pytorch_model*.bin) weights. Use the original model's repo instead (a GGUF repo's "
                "model card usually names it; it is often the same name without -GGUF)."
            )
    raise ModelError(
        f"Hub repo {reference} has no model weights: no *.safetensors, pytorch_model*.bin, *.pt or *.pth file "
        f"among its {len(files)} files. Check the repo id and revision (a repo of code or data is not a model)."
    )


def remote_tensors(repo: HubRepo, reference: str) -> dict[str, TensorLocation]:
    """Every tensor of a safetensors repo, read from the headers (over HTTP for shards not in the cache).

    Locations point into the snapshot folder where `download` puts each file.
    """
    weight_map: dict[str, str] | None = None
    shards = repo.weight_files
    if INDEX_NAME in repo.files:
        weight_map = _read_weight_map(repo, reference)
        shards = tuple(sorted(set(weight_map.values())))
        missing = sorted(set(shards) - set(repo.files))
        if missing:
            raise ModelError(
                f"Hub repo {reference}: {INDEX_NAME} names shard {missing[0]!r}, which the repo does not have "
                f"at commit {repo.commit}. The repo is incomplete; pick a revision whose upload finished (@revision)."
            )
    tensors: dict[str, TensorLocation] = {}
    for shard in shards:
        for name, location in _shard_header(repo, reference, shard).items():
            if weight_map is not None and weight_map.get(name, shard) != shard:
                continue  # the index names another shard's copy
            if name in tensors:
                raise ModelError(
                    f"Hub repo {reference} has tensor {name!r} in two files, {tensors[name].file.name} and {shard}, "
                    f"and no {INDEX_NAME} saying which is the model's. Pick a revision without the stray copy."
                )
            tensors[name] = location
    return tensors


def _read_weight_map(repo: HubRepo, reference: str) -> dict[str, str]:
    try:
        weight_map = json.loads((repo.folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelError(
            f"Hub repo {reference}: its {INDEX_NAME} is not a valid weights index (a JSON object with a "
            "weight_map). Pick another revision, or report it to the repo's owner."
        ) from None
    return {str(name): str(file) for name, file in weight_map.items()}


def _shard_header(repo: HubRepo, reference: str, shard: str) -> dict[str, TensorLocation]:
    """A shard's header: from the cached file when complete, else two range requests at most."""
    from frankenmoe.io.safetensors import read_header

    path = repo.folder / shard
    if repo.cached(shard):
        return read_header(path)
    size = repo.files[shard]
    head = _read_range(repo, reference, shard, 0, min(size, HEADER_PREFETCH_BYTES))
    if len(head) < 8:
        raise _corrupt_remote(reference, shard, f"it is {size} bytes long, too short to hold a header")
    (header_length,) = struct.unpack("<Q", head[:8])
    if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
        raise _corrupt_remote(reference, shard, f"its header claims {header_length} bytes in a {size}-byte file")
    raw = head[8 : 8 + header_length]
    if len(raw) < header_length:
        raw += _read_range(repo, reference, shard, len(head), 8 + header_length)
    # Where the bytes are while the shard is not downloaded: --stream-sources reads them from there.
    remote = RemoteFile(repo.repo_id, repo.commit, shard, size, reference)
    locations = parse_header(path, raw, 8 + header_length, size - 8 - header_length)
    return {name: dataclasses.replace(location, remote=remote) for name, location in locations.items()}


def _read_range(repo: HubRepo, reference: str, name: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file at the resolved commit."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo.repo_id, name, revision=repo.commit)
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}"}
    with hub_errors(reference):
        response = get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(response)
    return bytes(response.content[: end - start])


def _corrupt_remote(reference: str, name: str, detail: str) -> ModelError:
    return ModelError(
        f"{name} in Hub repo {reference} is not a valid safetensors file: {detail}. Pick another revision, or report "
        "it to the repo's owner."
    )


def fetch(repo: HubRepo, names: Iterable[str], show_progress: bool = True) -> None:
    """Download files of the resolved commit into the cache (complete ones are not fetched again).

    Weight files go through `_download_resumable`: huggingface_hub 2.x deletes a partial download when it
    fails, so a 14 GB shard cut off at 90% would start again from zero; small files use hf_hub_download.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_on = not are_progress_bars_disabled()
    if not show_progress:
        disable_progress_bars()
    try:
        for name in names:
            if repo.cached(name):
                continue
            with hub_errors(repo.reference, name):
                if name in repo.weight_files:
                    logger.info("downloading %s from %s (%s)", name, repo.reference, _gb(repo.files[name]))
                    _download_resumable(repo, name, show_progress)
                else:
                    hf_hub_download(repo.repo_id, name, revision=repo.commit)
    finally:
        if bars_were_on and not show_progress:
            enable_progress_bars()


DOWNLOAD_ATTEMPTS = 4
BACKOFF_SECONDS = 1.0
"""Wait before the second attempt; doubled before each further one."""


def _download_resumable(repo: HubRepo, name: str, show_progress: bool) -> None:
    """Download one file into the cache's layout (blobs/<etag>, snapshots/<commit>/<name> -> blob), appending
    to `blobs/<etag>.incomplete` from where an earlier, interrupted run or attempt stopped (HTTP Range)."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, tqdm

    url = hf_hub_url(repo.repo_id, name, revision=repo.commit)
    metadata = get_hf_file_metadata(url)
    if metadata.commit_hash not in (None, repo.commit) or metadata.etag is None:
        raise ModelError(
            f"Hub repo {repo.reference} answered for commit {metadata.commit_hash} when {repo.commit} was asked for "
            f"({name}). The endpoint ({constants.ENDPOINT}) is not serving a fixed commit; run again."
        )
    size = repo.files[name] if metadata.size is None else metadata.size
    blob = repo.folder.parent.parent / "blobs" / metadata.etag
    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.is_file():
        progress = tqdm(total=size, unit="B", unit_scale=True, desc=name, disable=not show_progress)
        with progress:
            for attempt in range(DOWNLOAD_ATTEMPTS):
                have = partial.stat().st_size if partial.is_file() else 0
                progress.n = have
                if have >= size:
                    break
                try:
                    headers = {**build_hf_headers(), "Range": f"bytes={have}-"}
                    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
                    with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
                        hf_raise_for_status(response)
                        # A server that ignores Range sends the whole file: start the partial file again.
                        with partial.open("ab" if response.status_code == 206 else "wb") as handle:
                            for chunk in response.iter_bytes():  # as received: a cut-off transfer keeps every byte
                                handle.write(chunk)
                                progress.update(len(chunk))
                except httpx2.TransportError:
                    if attempt == DOWNLOAD_ATTEMPTS - 1:
                        raise
                    logger.warning("download of %s from %s was cut off; resuming", name, repo.reference)
                    time.sleep(BACKOFF_SECONDS * 2**attempt)
        if partial.stat().st_size != size:
            raise ModelError(
                f"The download of {name} from Hub repo {repo.reference} ended at {partial.stat().st_size} of {size} "
                "bytes. Run again: it resumes where it stopped."
            )
        os.replace(partial, blob)
    link = repo.folder / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_file():
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@dataclass(frozen=True)
class Stream:
    """One Hub file the merge reads over HTTP instead of downloading it, and how many of its bytes."""

    repo: HubRepo
    name: str
    size: int
    read_bytes: int


def describe_streams(streams: tuple[Stream, ...]) -> list[str]:
    """The dry run's lines for --stream-sources: what the writer would read over HTTP, file by file."""
    if not streams:
        return ["streamed: nothing (no Hub file is read over HTTP)"]
    total = sum(item.read_bytes for item in streams)
    lines = [f"streamed over HTTP, not stored: {len(streams)} file(s), {_gb(total)} read in total"]
    lines += [
        f"  {item.repo.repo_id}@{item.repo.commit[:12]} {item.name} ({item.read_bytes:,} of {item.size:,} bytes)"
        for item in streams
    ]
    return lines


def check_download_space(downloads: Iterable[Download], out: Path, output_bytes: int) -> None:
    """The downloads fit in the cache's file system, and with the output when both share one."""
    from huggingface_hub import constants

    needed = sum(download.size for download in downloads)
    if needed == 0:
        return
    cache = _existing(Path(constants.HF_HUB_CACHE))
    free = shutil.disk_usage(cache).free
    shared = cache.stat().st_dev == _existing(Path(out).absolute().parent).stat().st_dev
    total = needed + (output_bytes if shared else 0)
    if total > free:
        with_output = f" plus the {_gb(output_bytes)} output on the same disk" if shared else ""
        raise OutputError(
            f"Not enough free disk for the merge's downloads: {_gb(needed)} of source weights{with_output} need "
            f"{_gb(total)}, but {cache} has {_gb(free)} free. Free some space, or point HF_HUB_CACHE (or HF_HOME) "
            "at a larger disk."
        )


def download(downloads: Iterable[Download], show_progress: bool) -> None:
    for item in downloads:
        fetch(item.repo, [item.name], show_progress)


def describe_downloads(downloads: tuple[Download, ...]) -> list[str]:
    """The dry run's lines: what a merge would download, file by file, and the total."""
    if not downloads:
        return ["downloads: none (every file the merge reads is in the Hugging Face cache or local)"]
    lines = [f"downloads: {len(downloads)} file(s), {_gb(sum(item.size for item in downloads))} in total"]
    lines += [f"  {item.repo.repo_id}@{item.repo.commit[:12]} {item.name} ({item.size:,} bytes)" for item in downloads]
    return lines


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10_000_000 else f"{size:,} bytes"
