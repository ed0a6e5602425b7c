"""Content-addressed blob store: ``MODEL_DIR/blobs/ab/<sha256>``.

Blobs are immutable: a blob's name is the SHA-256 of its bytes, so writing the same bytes twice is a no-op and a
reader never sees a half-written file (each write goes to a temporary file in the same folder, is fsynced, then
``os.replace``d into place). Image snapshots and masks of the corrections datastore live here, so training never needs
Label Studio to be up.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobNotFound(KeyError):
    pass


class BlobStore:
    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync

    # -- addressing -------------------------------------------------------------------------------------------------
    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, sha: str) -> Path:
        if not _SHA_RE.match(sha or ""):
            raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
        return self.root / sha[:2] / sha

    # -- bytes ------------------------------------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        """Store ``data`` and return its SHA-256 hex digest (idempotent, atomic)."""
        data = bytes(data)
        sha = self.digest(data)
        target = self.path(sha)
        if target.exists() and target.stat().st_size == len(data):
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(sha) from exc

    def exists(self, sha: str) -> bool:
        try:
            return self.path(sha).exists()
        except ValueError:
            return False

    def verify(self, sha: str) -> bool:
        """True when the blob exists and its bytes still hash to its name."""
        try:
            return self.digest(self.get(sha)) == sha
        except BlobNotFound:
            return False

    # -- masks ------------------------------------------------------------------------------------------------------
    def put_mask(self, mask: np.ndarray) -> str:
        """Store a 2-D boolean mask as a 1-bit PNG (compact, lossless) and return its digest."""
        return self.put(encode_mask_png(mask))

    def get_mask(self, sha: str) -> np.ndarray:
        return decode_mask_png(self.get(sha))


def encode_mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    img = Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L").convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")) > 0
