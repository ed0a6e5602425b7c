"""Published model versions: what the trainer writes and the server reads (and hot-reloads).

Layout under ``MODEL_DIR/versions/``::

    <version>/model.pt     a model bundle (ssp_sam.checkpoints.save_bundle)
    current.json           {"version", "path", "parent", "created_at", "metrics", "run_id"}

``path`` in ``current.json`` is relative to ``versions/`` (or absolute). The pointer is replaced atomically, and only
after the bundle it names is completely written, so a reader sees the old version or the new one, never a part.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ssp_sam.io import write_text_atomic

log = logging.getLogger(__name__)

POINTER = "current.json"
BUNDLE = "model.pt"


@dataclass(frozen=True)
class PublishedVersion:
    version: str
    path: str                                 # absolute path of the bundle
    record: dict = field(default_factory=dict, compare=False)   # the pointer's content


def versions_dir(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / "versions"


def pointer_path(model_dir: str | os.PathLike) -> Path:
    return versions_dir(model_dir) / POINTER


def pointer_signature(model_dir: str | os.PathLike) -> tuple | None:
    """What changes whenever the pointer is replaced (None when there is none): cheap enough to check per request."""
    try:
        st = os.stat(pointer_path(model_dir))
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def read_current(model_dir: str | os.PathLike) -> PublishedVersion | None:
    """The published version, or None when nothing is published or the pointer is unusable (logged)."""
    path = pointer_path(model_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable version pointer %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not data.get("version") or not data.get("path"):
        log.warning("ignoring version pointer %s without 'version' and 'path'", path)
        return None
    bundle = Path(data["path"])
    bundle = bundle if bundle.is_absolute() else path.parent / bundle
    if not bundle.is_file():
        log.warning("version pointer %s names a missing bundle %s; ignored", path, bundle)
        return None
    return PublishedVersion(str(data["version"]), str(bundle.resolve()), data)


def new_version_name(variant: str) -> str:
    return f"{variant}-ft-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def bundle_path(model_dir: str | os.PathLike, version: str) -> Path:
    """Where the bundle of ``version`` is written before it is published."""
    return versions_dir(model_dir) / version / BUNDLE


def publish(model_dir: str | os.PathLike, version: str, record: Mapping[str, Any]) -> PublishedVersion:
    """Point ``current.json`` at the (already written) bundle of ``version``; ``record`` adds parent, metrics, ..."""
    bundle = bundle_path(model_dir, version)
    if not bundle.is_file():
        raise FileNotFoundError(f"cannot publish {version}: {bundle} does not exist")
    data = {**record, "version": version, "path": f"{version}/{BUNDLE}",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(pointer_path(model_dir), json.dumps(data, indent=2, sort_keys=True, default=str))
    return PublishedVersion(version, str(bundle.resolve()), data)


def list_versions(model_dir: str | os.PathLike) -> list[str]:
    """Every version folder that holds a bundle, oldest name first."""
    root = versions_dir(model_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / BUNDLE).is_file())


__all__ = ["PublishedVersion", "versions_dir", "pointer_path", "pointer_signature", "read_current",
           "new_version_name", "bundle_path", "publish", "list_versions"]
