"""Tensor bytes read straight from a Hub repo over HTTP range requests (`--stream-sources`).

A TensorLocation whose shard is not in the Hugging Face cache carries a RemoteFile (hub.remote_tensors
attaches it). When the shard is still absent at read time, because the merge streams its sources
instead of downloading them, tensor_io's readers and the shard writer come here: the tensor's byte
range is requested at the commit resolved at planning time and handed on in chunks of
STREAM_CHUNK_BYTES, so memory stays a few MiB whatever the tensor's size (except where a caller asks
for a whole tensor, as transforms and dtype conversion do; they hold it in memory either way).

Transient failures (a dropped connection, a timeout, HTTP 5xx) are retried with back-off, each retry
asking only for the bytes not received yet. Every answer must come from the resolved commit
(X-Repo-Commit) and carry the file's first-seen ETag: a repo that changes under a running merge is a
ModelError naming it, never a checkpoint mixing two versions.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from frankenmoe.errors import ModelError, OutputError

STREAM_CHUNK_BYTES = 4 * 1024 * 1024
"""Bytes received and handed on at a time: the memory one streamed copy holds."""
STREAM_ATTEMPTS = 5
BACKOFF_SECONDS = 1.0
"""Wait before the second attempt of a range; doubled before each further one."""


@dataclass(frozen=True)
class RemoteFile:
    """One weight file of a Hub repo at the commit a merge resolved it to."""

    repo_id: str
    commit: str
    name: str
    size: int
    reference: str
    """The repo as the config names it (`org/name[@revision]`), for messages."""


_etags: dict[tuple[str, str, str], str] = {}
"""(repo, commit, file) -> the ETag of the first answer; later answers must carry the same."""
_etags_lock = threading.Lock()


def read_into(remote: RemoteFile, start: int, buffer: memoryview, tensor: str) -> None:
    """Fill `buffer` with the file's bytes from offset `start`."""
    filled = 0
    for chunk in iter_range(remote, start, start + len(buffer), tensor):
        buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


def iter_range(remote: RemoteFile, start: int, end: int, tensor: str) -> Iterator[memoryview]:
    """The file's bytes [start, end) in order, each once, in chunks of at most STREAM_CHUNK_BYTES.

    One request for the whole range (a request per chunk would pay the Hub's latency per chunk); after a
    transient error, the next attempt asks only for the bytes not yet handed on.
    """
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(remote.repo_id, remote.name, revision=remote.commit)
    position = start  # the next byte to receive
    pending = bytearray()  # received, not handed on yet: kept across a retry, so no byte is asked for twice
    failure = "the answers ended early"
    for attempt in range(STREAM_ATTEMPTS):
        if pending:
            chunk, pending = pending, bytearray()
            yield memoryview(chunk)
        if position >= end:
            return
        if attempt:
            time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
        headers = {**build_hf_headers(), "Range": f"bytes={position}-{end - 1}"}
        timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        try:
            with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code >= 500:
                    failure = f"HTTP {response.status_code}"
                    continue
                if response.status_code >= 400:
                    response.read()
                    with hub_errors(remote.reference, remote.name):
                        hf_raise_for_status(response)
                _check_same_version(remote, response, tensor)
                if response.status_code != 206 and position > 0:
                    raise ModelError(
                        f"The Hub at {constants.ENDPOINT} ignored a range request for {remote.name} of "
                        f"{remote.reference} (it answered with the whole file), so it cannot be streamed. Run without "
                        "--stream-sources: the files the merge reads are then downloaded into the Hugging Face cache."
                    )
                # As received (a cut-off answer keeps every byte it brought), handed on in chunks.
                for received in response.iter_bytes():
                    received = received[: end - position]  # a server ignoring Range at offset 0 sends the whole file
                    pending += received
                    position += len(received)
                    if len(pending) >= STREAM_CHUNK_BYTES or position >= end:
                        chunk, pending = pending, bytearray()
                        yield memoryview(chunk)
                    if position >= end:
                        return
        except httpx2.TransportError as error:
            failure = f"{type(error).__name__}: {error}"
    raise ModelError(
        f"Streaming {remote.name} of Hub repo {remote.reference} (tensor {tensor!r}) failed {STREAM_ATTEMPTS} times "
        f"in a row ({failure}) at byte {position} of {remote.size}. Check the network (and HF_ENDPOINT) and run "
        "again, or run without --stream-sources to download the files first (an interrupted download resumes)."
    )


def _check_same_version(remote: RemoteFile, response: object, tensor: str) -> None:
    """The answer is the resolved commit's file, with the ETag its first answer had."""
    from huggingface_hub import constants

    answers = [*getattr(response, "history", ()), response]
    commits = {answer.headers.get("X-Repo-Commit") for answer in answers} - {None}  # type: ignore[attr-defined]
    etag = next(
        (
            value.strip('"').removeprefix("W/").strip('"')
            for answer in answers
            for value in (answer.headers.get("X-Linked-Etag"),)  # type: ignore[attr-defined]
            if value
        ),
        str(response.headers.get("ETag", "")).removeprefix("W/").strip('"'),  # type: ignore[attr-defined]
    )
    key = (remote.repo_id, remote.commit, remote.name)
    with _etags_lock:
        expected = _etags.setdefault(key, etag)
    if commits - {remote.commit} or (etag and expected and etag != expected):
        answered = ", ".join(sorted(commits - {remote.commit})) or remote.commit
        raise ModelError(
            f"Hub repo {remote.reference} changed while the merge was streaming it: {remote.name} (tensor {tensor!r}) "
            f"was asked for at commit {remote.commit} and the endpoint ({constants.ENDPOINT}) answered with commit "
            f"{answered}, ETag {etag or '?'} (first seen: {expected or '?'}). Nothing was written to the output. Run "
            "again to merge the repo's new commit, or pin one in the config (org/name@<commit>)."
        )


def split_repo_reference(reference: str) -> tuple[str, str]:
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or "main"


# One except clause per error, each with its own message: splitting it would only scatter the table.
@contextlib.contextmanager
def hub_errors(reference: str, name: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's exceptions into one-paragraph messages naming the repo."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_repo_reference(reference)
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        token = "a token was sent but is not allowed" if _has_token() else "no token was sent"
        raise ModelError(
            f"Hub repo {repo_id} is gated: its files need a logged-in user who accepted its conditions ({token}). "
            f"Accept them on {endpoint}/{repo_id}, then set HF_TOKEN to a read token of that account (or run "
            "`hf auth login`) and run again."
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"Hub repo {repo_id} does not exist on {endpoint} (or is private). Check the repo id in the config; for a "
            "private repo set HF_TOKEN to a token that can read it; for a local folder, give its path (./name)."
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"Hub repo {repo_id} has no revision {revision!r}. Check the branch, tag or commit after the @ in the "
            f"config (the repo's branches are listed on {endpoint}/{repo_id}/tree/main), or drop it for main."
        ) from None
    except RemoteEntryNotFoundError:
        raise ModelError(
            f"Hub repo {reference} has no file {name!r} at its resolved commit although the listing named it. The "
            "repo changed while frankenmoe read it; run again."
        ) from None
    except OfflineModeIsEnabled:
        raise ModelError(
            f"Hub repo {reference} is needed but offline mode is on. Run without --offline and HF_HUB_OFFLINE, or "
            f"fetch it first with `hf download {repo_id}`."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise ModelError(
            f"The Hub at {endpoint} refused a request for {reference}{f' ({name})' if name else ''} with HTTP {status}: "
            f"{error}. If it is 401 or 403, set HF_TOKEN to a token that can read the repo; otherwise try again later."
        ) from None
    except (httpx2.TransportError, ConnectionError) as error:
        raise ModelError(
            f"Cannot reach the Hub at {endpoint} to resolve {reference} ({type(error).__name__}: {error}). Check the "
            "network (and HF_ENDPOINT), or run with --offline (HF_HUB_OFFLINE=1) to use only what is already in the "
            "Hugging Face cache. An interrupted download resumes on the next run."
        ) from None
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise OutputError(
            f"The disk filled up while downloading {name} of {reference} into {constants.HF_HUB_CACHE}. Free some "
            "space (or point HF_HUB_CACHE at a larger disk) and run again: the partial download is kept and resumes."
        ) from None


def _has_token() -> bool:
    from huggingface_hub.utils import get_token

    return get_token() is not None
