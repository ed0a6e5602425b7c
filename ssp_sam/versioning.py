"""Version strings of model weights, computed without loading them (and without importing torch).

The backend reports a version before any weights are loaded (Label Studio's ``/setup`` must be O(1)), and
``load_model`` reports the same string once they are: ``<variant>-<first 8 hex of the checkpoint's SHA-256>``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "ssp_sam_demo.pt"

_DIGESTS: dict[tuple, str] = {}
_LOCK = threading.Lock()


def file_digest(path: str | os.PathLike, n: int = 8) -> str:
    """First ``n`` hex digits of the file's SHA-256, cached by (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key][:n]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with _LOCK:
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key][:n]


def remember_digest(path: str | os.PathLike, sha256: str, size: int, mtime_ns: int) -> bool:
    """Take a SHA-256 computed elsewhere (a weights manifest, written when the file was verified) for the file as
    it is now, so that its version needs no second pass over gigabytes; only when its size and modification time are
    still those it was verified with. Returns whether it was taken."""
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        return False
    with _LOCK:
        _DIGESTS[(os.path.abspath(path), st.st_size, st.st_mtime_ns)] = sha256
    return True


def default_checkpoint(variant: str, checkpoint: str | None) -> str | None:
    """The checkpoint a (variant, checkpoint) pair really uses: the packaged bundle for ``demo`` by default."""
    if checkpoint:
        return str(checkpoint)
    return str(DEMO_CHECKPOINT) if variant == "demo" else None


def weights_version(variant: str, checkpoint: str | None) -> str:
    """``<variant>-<sha8>`` of the checkpoint that will be loaded (``<variant>-random`` without one)."""
    ckpt = default_checkpoint(variant, checkpoint)
    return f"{variant}-{file_digest(ckpt)}" if ckpt else f"{variant}-random"
