"""Durable file writes shared by checkpoint writers: fsync a path, write JSON that survives a crash."""

from __future__ import annotations

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
