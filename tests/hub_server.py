"""A Hugging Face Hub look-alike on 127.0.0.1 that serves local model folders, for tests.

Why not a package: `olah` (0.5.4) is a caching mirror of an upstream Hub or of git repositories with
LFS, and pulls in fastapi, pydantic and gitpython; `hf-local-hub` (3.0.0) is a launcher for a
separately downloaded server binary. Neither serves plain local folders, and neither can mark a repo
gated or cut a transfer short, which the tests need. This server implements only the endpoints
huggingface_hub 2.x calls for what frankenmoe does:

- GET  /api/models/{org}/{name}/revision/{rev}[?blobs=true]  -> {"id", "sha", "siblings": [...]}
- GET  /api/models/{org}/{name}/tree/{rev}[?recursive=true]  -> [{"type", "path", "size", "oid", "lfs"}]
- HEAD/GET /{org}/{name}/resolve/{rev}/{path}  with X-Repo-Commit, ETag, X-Linked-Etag/Size for LFS
  files, Content-Length, and `Range: bytes=a-b` answered with 206.

Errors carry the X-Error-Code headers the client maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Every request is logged.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx")
"""Files the Hub stores in LFS: their ETag is the content's sha256 (the cache names blobs after it)."""


@dataclass
class Repo:
    folder: Path
    revisions: dict[str, str]
    """Branch or tag name -> commit hash; every commit serves the same folder."""
    gated: int | None = None
    """401 or 403: files are refused without the token (the repo's API info stays public, as on the Hub)."""
    moved: tuple[str, Path] | None = None
    """(commit, folder) that every file request is answered from once the repo has moved (`HubServer.move`),
    whatever commit it asks for: a mirror serving its branch head, or a repo rewritten mid-merge."""
    move_after: tuple[int, str, Path] | None = None
    """(data requests, commit, folder): the repo moves after this many more ranged GETs of its weights."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    token: str = "hf_test_token"
    log: list[Request] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)
    """File path in a repo ("org/name/file") -> the byte at which every transfer of it stops and the
    connection drops, as when a server goes away mid-download (the client's own retries get nothing more)."""
    sent_bytes: int = 0
    """Bytes of file content sent (what clients downloaded), for the benchmark."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    faults: dict[str, list[str]] = field(default_factory=dict)
    """File path in a repo -> faults for its next ranged GETs of tensor bytes (a Range not starting at 0,
    so header reads are spared), one per request: "drop" sends half the range and closes the connection,
    "503" answers Service Unavailable."""
    url: str = ""

    def add(self, repo_id: str, folder: Path, revisions: dict[str, str] | None = None, gated: int | None = None) -> str:
        """Serve `folder` as `repo_id`; returns its main commit hash."""
        commit = hashlib.sha1(f"{repo_id}@main".encode()).hexdigest()
        self.repos[repo_id] = Repo(folder, {"main": commit, **(revisions or {})}, gated)
        return commit

    def move(self, repo_id: str, folder: Path, after_requests: int = 0) -> str:
        """Make `repo_id` answer from `folder` at a new commit after `after_requests` more ranged GETs of
        its tensor bytes; returns the new commit."""
        commit = hashlib.sha1(f"{repo_id}@moved".encode()).hexdigest()
        self.repos[repo_id].move_after = (after_requests, commit, folder)
        return commit

    def requests_for(self, repo_id: str) -> list[Request]:
        return [request for request in self.log if f"/{repo_id}/" in request.path]

    def downloaded_files(self) -> set[str]:
        """`org/name/file` of every file whose bytes were asked for (GET of a resolve URL)."""
        pattern = re.compile(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$")
        return {
            f"{match[1]}/{match[2]}"
            for request in self.log
            if request.method == "GET" and (match := pattern.match(request.path))
        }

    @contextlib.contextmanager
    def start(self) -> Iterator[HubServer]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, name="hub-server", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


def _files(folder: Path) -> dict[str, Path]:
    return {str(path.relative_to(folder)): path for path in sorted(folder.rglob("*")) if path.is_file()}


SEND_CHUNK_BYTES = 1024 * 1024
"""Bytes read from a file and sent at a time: serving a range of a multi-GB shard holds 1 MiB."""


@functools.lru_cache(maxsize=4096)
def _digests(path: Path, size: int, modified: int) -> tuple[str, str]:
    """git's blob id and the sha256 of a file, read in chunks (size and mtime make the cache key honest)."""
    blob = hashlib.sha1(b"blob %d\0" % size)
    content = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(SEND_CHUNK_BYTES):
            blob.update(chunk)
            content.update(chunk)
    return blob.hexdigest(), content.hexdigest()


def _etag(path: Path, git_id: bool = False) -> str:
    """A file's ETag on the Hub: the sha256 for LFS files, git's blob id for the rest (or always, with git_id)."""
    status = path.stat()
    blob, content = _digests(path, status.st_size, status.st_mtime_ns)
    return content if path.name.endswith(LFS_SUFFIXES) and not git_id else blob


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test reads hub.log instead

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log.append(Request(self.command, path, self.headers.get("Range")))
            if match := re.match(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", path):
                self._info(match[1], match[2])
            elif match := re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path):
                self._tree(match[1], match[2], match[3] or "", parse_qs(url.query).get("recursive") == ["true"])
            elif match := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
                self._resolve(match[1], match[2], match[3], body)
            else:
                self._error(404, "EntryNotFound", f"no route for {path}")

        def _repo(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            commit = repo.revisions.get(revision, revision if revision in repo.revisions.values() else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _entry(self, repo: Repo, name: str, path: Path) -> dict[str, object]:
            size = path.stat().st_size
            entry: dict[str, object] = {"rfilename": name, "size": size, "blobId": _etag(path, git_id=True)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"sha256": _etag(path), "size": size, "pointerSize": 134}
            return entry

        def _info(self, repo_id: str, revision: str) -> None:
            found = self._repo(repo_id, revision)
            if found is not None:
                repo, commit = found
                siblings = [self._entry(repo, name, path) for name, path in _files(repo.folder).items()]
                self._json({"id": repo_id, "sha": commit, "gated": bool(repo.gated), "siblings": siblings})

        def _tree(self, repo_id: str, revision: str, under: str, recursive: bool) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            entries = []
            for name, path in _files(found[0].folder).items():
                if not name.startswith(under) or (not recursive and "/" in name[len(under) :].strip("/")):
                    continue
                sibling = self._entry(found[0], name, path)
                entry = {"type": "file", "path": name, "size": sibling["size"], "oid": sibling["blobId"]}
                if "lfs" in sibling:
                    lfs = dict(sibling["lfs"])  # type: ignore[call-overload]
                    entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(repo.gated, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return
            data_request = body and bool(re.match(r"^bytes=[1-9]", self.headers.get("Range") or ""))
            if data_request and repo.move_after is not None:
                remaining, new_commit, new_folder = repo.move_after
                repo.move_after = (remaining - 1, new_commit, new_folder) if remaining else None
                if not remaining:
                    repo.moved = (new_commit, new_folder)
            folder = repo.folder
            if repo.moved is not None:
                commit, folder = repo.moved
            fault = hub.faults.get(f"{repo_id}/{name}")
            fault = fault.pop(0) if data_request and fault else None
            if fault == "503":
                self._error(503, "ServiceUnavailable", "The service is temporarily unavailable.")
                return
            path = _files(folder).get(name)
            if path is None:
                self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
                return
            size = path.stat().st_size
            etag = _etag(path)
            start, end = 0, size
            if match := re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range") or ""):
                start, end = int(match[1]), min(size, int(match[2]) + 1 if match[2] else size)
            self.send_response(206 if self.headers.get("Range") else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if name.endswith(LFS_SUFFIXES):
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            if self.headers.get("Range"):
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not body:
                return
            cut = hub.cut_after.get(f"{repo_id}/{name}")
            if fault == "drop":
                cut = start + (end - start) // 2
            stop = max(start, cut) if cut is not None and cut < end else end
            with path.open("rb") as handle:
                handle.seek(start)
                for offset in range(start, stop, SEND_CHUNK_BYTES):
                    chunk = handle.read(min(SEND_CHUNK_BYTES, stop - offset))
                    self.wfile.write(chunk)
                    with hub.lock:
                        hub.sent_bytes += len(chunk)
            if stop < end:
                self.wfile.flush()
                self.close_connection = True

        def _json(self, data: object) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

    return Handler
