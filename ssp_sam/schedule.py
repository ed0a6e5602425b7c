"""The learning-rate schedule: linear warm-up from ``lr_min``, then cosine down to ``lr_min``, over training progress.

:class:`WarmupCosine` is a ``torch.optim.lr_scheduler.LRScheduler`` driven by a progress value in [0, 1] instead of
a step count, so one class serves the three ways a run measures how far it is (``TrainConfig.schedule``):

* ``"step"``: optimiser steps taken / total steps (the lr changes every step);
* ``"epoch"``: epochs completed / epochs (constant within an epoch, like the official timm scheduler);
* ``"time"``: wall time spent / ``time_limit_min`` (rank 0's clock, so every process agrees).

The training loop calls ``scheduler.step(progress)`` after each ``optimizer.step()``; the lr it sets is the one the
next step uses. ``state_dict`` holds the progress and base lrs, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("step", "epoch", "time")


def warmup_cosine(progress: float, warmup: float, floor: float) -> float:
    """Multiplier of the base lr at ``progress`` in [0, 1]: from ``floor`` linearly up to 1 at ``warmup`` (a fraction
    of the run), then a half cosine back down to ``floor`` at 1."""
    if warmup > 0 and progress < warmup:
        return floor + (1 - floor) * progress / warmup
    span = max(1.0 - warmup, 1e-9)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class WarmupCosine(LRScheduler):
    """Warm-up then cosine, per parameter group, as a function of ``progress`` (see the module doc).

    ``warmup``: the warm-up's share of the run, in progress units. Every group goes from ``lr_min`` to its own base lr
    and back (a group whose base lr is at or below ``lr_min`` stays at its base lr; a zero base lr stays zero).
    """

    def __init__(self, optimizer: Optimizer, warmup: float, lr_min: float, last_epoch: int = -1) -> None:
        self.warmup = float(warmup)
        self.lr_min = float(lr_min)
        self.progress = 0.0
        super().__init__(optimizer, last_epoch)

    def _floor(self, base: float) -> float:
        return min(self.lr_min / base, 1.0) if base > 0 else 0.0

    def get_lr(self) -> list[float]:
        return [base * warmup_cosine(self.progress, self.warmup, self._floor(base)) for base in self.base_lrs]

    def step(self, progress: float | None = None) -> None:  # type: ignore[override]
        """Set the lr of every group for training ``progress`` (clamped to [0, 1]; None keeps the current one)."""
        if progress is not None:
            self.progress = min(max(float(progress), 0.0), 1.0)
        super().step()


def warmup_fraction(schedule: str, warmup_epochs: float, epochs: int, steps_per_epoch: int, total_steps: int) -> float:
    """``warmup_epochs`` in progress units of ``schedule``. Under ``"time"`` the warm-up is the same share of the
    budget as of the epochs, at most half of it."""
    if schedule == "step":
        return warmup_epochs * steps_per_epoch / max(total_steps, 1)
    if schedule == "epoch":
        return warmup_epochs / max(epochs, 1)
    if schedule == "time":
        return min(warmup_epochs / max(epochs, 1), 0.5)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


__all__ = ["WarmupCosine", "warmup_cosine", "warmup_fraction", "SCHEDULES"]
