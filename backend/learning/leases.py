"""Who holds a lease: the correction worker's events and the trainer's claims carry an owner id made of the host, the
process id and a random part. A process that starts looks for leases held by processes of its own host that are
gone (``kill -9``, a crash, a container restart) and releases them at once, instead of letting them wait out their
lease; leases of other hosts (several replicas on PostgreSQL) are left to expire, which a live holder prevents by
renewing them."""

from __future__ import annotations

import os
import socket
import uuid

HOST = socket.gethostname()


def new_owner_id(role: str) -> str:
    """``<role>:<host>:<pid>:<random>``."""
    return f"{role}:{HOST}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def is_dead_local_owner(owner: str | None) -> bool:
    """True when ``owner`` names a process of this host that no longer exists (False when unsure: another host, a
    name not made by :func:`new_owner_id`, a process we may not signal)."""
    parts = (owner or "").split(":")
    if len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


__all__ = ["HOST", "new_owner_id", "is_dead_local_owner"]
