"""sha256 of files, read in chunks of one size everywhere (manifests, verify, the shard writer's hasher)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def file_sha256(path: Path, follow_symlinks: bool = True) -> str:
    """sha256 of a file, read in chunks; without `follow_symlinks`, a symbolic link is an OSError.

    >>> import tempfile; folder = Path(tempfile.mkdtemp()); (folder / "x").write_bytes(b"abc")
    3
    >>> file_sha256(folder / "x")[:8]
    'ba7816bf'
    """
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    with os.fdopen(os.open(path, flags), "rb", buffering=0) as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
