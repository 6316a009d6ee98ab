"""Atomic file writes (temp file in the same folder, then rename): a failure never leaves half a file.

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask; a renamed temp file would keep it. Every
file written here gets the mode an ordinary `open(path, "w")` would give it: 0666 minus the process umask (0644
under the usual umask 022).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set-and-return)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # set-and-restore: the only portable way to read it
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a newly created regular file: 0666 & ~umask."""
    return 0o666 & ~current_umask()


def make_temp_beside(dest: Path) -> tuple[int, str]:
    """A temp file next to `dest` (same filesystem, so the final rename is atomic), with the umask's mode."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, default_file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    dest = Path(path)
    fd, tmp = make_temp_beside(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest
