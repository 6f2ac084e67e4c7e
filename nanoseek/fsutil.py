"""Durable file writes shared by checkpoint writers: fsync a path, write JSON that survives a crash,
and the content hash that checkpoint manifests record."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or directory to disk. A directory whose filesystem refuses fsync is not an error;
    a file that cannot be flushed is (its bytes may not be on disk)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_json_durable(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


_HASH_CHUNK = 8 << 20  # bytes read per call: large enough that the hash, not the calls, dominates


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, as hex (what ``sha256sum`` prints), read in 8 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()
