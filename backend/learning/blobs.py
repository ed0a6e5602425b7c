"""Content-addressed blob store: ``MODEL_DIR/blobs/ab/<sha256>``.

Blobs are immutable: a blob's name is the SHA-256 of its bytes, so writing the same bytes twice is a no-op and a
reader never sees a half-written file (``ssp_sam.io.write_bytes_atomic``: a temporary file in the same folder,
fsynced, then renamed into place). Image snapshots and masks (1-bit PNG, ``ssp_sam.data.masks``) of the corrections
datastore live here, so training never needs Label Studio to be up.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ssp_sam.data.masks import mask_to_png, png_to_mask
from ssp_sam.io import write_bytes_atomic

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobNotFound(KeyError):
    pass


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
        """Store ``data`` and return its SHA-256 hex digest (idempotent, atomic, fsynced)."""
        data = bytes(data)
        sha = self.digest(data)
        target = self.path(sha)
        if not (target.exists() and target.stat().st_size == len(data)):
            write_bytes_atomic(target, data)
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
        """Store a 2-D mask as a 1-bit PNG (compact, lossless) and return its digest."""
        return self.put(mask_to_png(mask))

    def get_mask(self, sha: str) -> np.ndarray:
        """The stored mask as (H, W) bool."""
        return png_to_mask(self.get(sha))
