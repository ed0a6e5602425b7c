"""The few torch.distributed calls training and evaluation share: joining the process group torchrun describes,
rank / world size, and the decisions every rank must take alike (rank 0's clock, merged metric states).

Without a process group (one process) every helper is the identity, so callers never branch on it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device, timeout: Optional[timedelta] = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (env ``WORLD_SIZE`` > 1; gloo on CPU, NCCL on CUDA) unless one is
    already up. Returns (rank, world, device): under CUDA each process takes the GPU of its ``LOCAL_RANK``.
    ``timeout``: how long a collective waits for the slowest rank (torch's default when None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    rank, world = rank_and_world()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        torch.cuda.set_device(device)
    return rank, world, device


def _collective_device() -> torch.device:
    """Where small collective tensors live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(value: float) -> float:
    """Rank 0's ``value`` on every rank (e.g. its clock, so all ranks take time-based decisions together)."""
    _, world = rank_and_world()
    if world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank: what rank 0 decided, every rank does."""
    _, world = rank_and_world()
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    _, world = rank_and_world()
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


__all__ = ["rank_and_world", "init_distributed", "from_rank0", "broadcast_object", "gather_objects"]
