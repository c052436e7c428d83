"""Files that must survive a power cut: written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync
    the directory. A crash at any point leaves the old file or the new one, never a mix.

    ``durable=False`` skips the fsyncs: still never a mix, but a power cut may bring back
    the previous version (for what is cheap to lose, such as a report that is resent)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if durable:
        fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    """Delete ``path`` (if it exists) and make the deletion survive a crash."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)
