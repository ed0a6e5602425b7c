"""Files written all or nothing: the one implementation of atomic writes (checkpoints, bundles, embeddings, datasets,
reports, the published-version pointer, blobs).

A reader never sees a half-written file and a crash never leaves one behind: the data goes to a temporary file in
the target's folder, is flushed and fsynced, then ``os.replace``d over the target (atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 permissions: int = 0o644) -> Iterator[IO]:
    """``with atomic_write(path, "w") as f: ...`` replaces ``path`` only when the block succeeds.

    ``permissions``: of the final file (0o600 for files holding secrets)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, permissions)
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, permissions: int = 0o644) -> None:
    with atomic_write(path, "wb", permissions=permissions) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, permissions: int = 0o644) -> None:
    with atomic_write(path, "w", encoding="utf-8", permissions=permissions) as f:
        f.write(text)


__all__ = ["atomic_write", "write_bytes_atomic", "write_text_atomic"]
