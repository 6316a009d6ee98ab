"""Atomic file writes (temp file in the same folder, then rename): a failure never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest
