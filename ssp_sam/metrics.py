"""Referring-segmentation metrics with the official GRES conventions (the official evaluation code of SSP-SAM).

Per sample (binary prediction P, ground truth G):

==========  ===========================  =====  =====  =========
GT          prediction                   IoU    I      U
==========  ===========================  =====  =====  =========
empty       fewer than the threshold     1      0      0
empty       at least the threshold       0      0      |P|
non-empty   (P u G) empty (cannot occur) 0      0      0
non-empty   anything                     I/U    |PnG|  |PuG|
==========  ===========================  =====  =====  =========

The "no target" threshold is 50 pixels in the official 512x512 frame; for other frames it is scaled by area:
``50 * side**2 / 512**2`` where ``side`` is the side of the padded square frame (F for the padded SAM frame,
max(H, W) at original resolution, whose padded square maps onto the official 512 frame).

Split metrics: mIoU = gIoU = mean IoU; oIoU = cIoU = sum I / sum U; Pr@X = fraction with IoU >= X for
X = 0.50, 0.55, ..., 0.90; N-acc = #(IoU == 1) / #(empty GT); T-acc = #(0 < IoU < 1) / #(non-empty GT) (the
official, loose definitions; a perfect non-empty prediction is not counted by T-acc). Undefined ratios are NaN.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

OFFICIAL_FRAME = 512
OFFICIAL_EMPTY_PIXELS = 50
PR_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(9))


def empty_threshold(frame_side: int) -> float:
    """Pixel count below which a prediction counts as "no target" in a square frame of this side."""
    return OFFICIAL_EMPTY_PIXELS * (float(frame_side) / OFFICIAL_FRAME) ** 2


def mask_iou(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None) -> tuple[float, int, int]:
    """(IoU, I, U) of two binary masks of the same shape with the GRES rule. ``threshold``: the no-target pixel
    threshold (default: scaled from the official one for a square of side max(H, W))."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} have different shapes")
    if threshold is None:
        threshold = empty_threshold(max(gt.shape))
    n_pred = int(pred.sum())
    if not gt.any():
        return (1.0, 0, 0) if n_pred < threshold else (0.0, 0, n_pred)
    inter = int(np.logical_and(pred, gt).sum())
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 0.0, 0, 0
    return inter / union, inter, union


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Plain IoU of two binary masks of one shape (1.0 when both are empty, 0.0 when only one is)."""
    return mask_iou(a, b, threshold=1)[0]


class MetricAccumulator:
    """Accumulates per-sample IoUs; ``compute()`` returns the split metrics, optionally per group (e.g. kind)."""

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.inter: list[int] = []
        self.union: list[int] = []
        self.empty_gt: list[bool] = []
        self.groups: list[str | None] = []

    def __len__(self) -> int:
        return len(self.ious)

    def add(self, pred: np.ndarray, gt: np.ndarray, threshold: float | None = None,
            group: str | None = None) -> float:
        """Score one sample (binary masks); returns its IoU."""
        iou, i, u = mask_iou(pred, gt, threshold)
        self.add_iou(iou, i, u, empty_gt=not np.asarray(gt).any(), group=group)
        return iou

    def add_iou(self, iou: float, inter: int, union: int, empty_gt: bool, group: str | None = None) -> None:
        """Record an already-computed sample (e.g. gathered from other ranks)."""
        self.ious.append(float(iou))
        self.inter.append(int(inter))
        self.union.append(int(union))
        self.empty_gt.append(bool(empty_gt))
        self.groups.append(group)

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        """Append another accumulator's samples (in place); returns self."""
        for name in ("ious", "inter", "union", "empty_gt", "groups"):
            getattr(self, name).extend(getattr(other, name))
        return self

    def state(self) -> dict[str, list]:
        """Plain lists, for pickling across processes."""
        return {k: list(getattr(self, k)) for k in ("ious", "inter", "union", "empty_gt", "groups")}

    @classmethod
    def from_state(cls, state: dict[str, list]) -> "MetricAccumulator":
        acc = cls()
        for k, v in state.items():
            setattr(acc, k, list(v))
        return acc

    def compute(self, by_group: bool = False) -> dict[str, float]:
        """mIoU, oIoU, gIoU, cIoU, Pr@0.50..0.90, N-acc, T-acc, n, n_empty (+ ``<group>/mIoU`` etc. if by_group)."""
        out = _summary(np.array(self.ious, np.float64), np.array(self.inter, np.int64),
                       np.array(self.union, np.int64), np.array(self.empty_gt, bool))
        if by_group:
            buckets: dict[str, list[int]] = defaultdict(list)
            for k, g in enumerate(self.groups):
                if g is not None:
                    buckets[g].append(k)
            for g, idx in sorted(buckets.items()):
                sub = _summary(np.array(self.ious)[idx], np.array(self.inter)[idx], np.array(self.union)[idx],
                               np.array(self.empty_gt)[idx])
                out.update({f"{g}/mIoU": sub["mIoU"], f"{g}/n": sub["n"]})
        return out


def _summary(ious: np.ndarray, inter: np.ndarray, union: np.ndarray, empty: np.ndarray) -> dict[str, float]:
    n = len(ious)
    nan = math.nan
    out: dict[str, float] = {}
    out["mIoU"] = float(ious.mean()) if n else nan
    su = int(union.sum())
    out["oIoU"] = float(inter.sum() / su) if su else nan
    out["gIoU"], out["cIoU"] = out["mIoU"], out["oIoU"]
    for x in PR_THRESHOLDS:
        out[f"Pr@{x:.2f}"] = float((ious >= x - 1e-12).mean()) if n else nan
    n_empty = int(empty.sum())
    out["N-acc"] = float((ious[empty] == 1.0).sum() / n_empty) if n_empty else nan
    n_t = n - n_empty
    t = ious[~empty]
    out["T-acc"] = float(((t > 0) & (t < 1)).sum() / n_t) if n_t else nan
    out["n"], out["n_empty"] = float(n), float(n_empty)
    return out


def format_table(metrics: dict[str, float], keys: list[str] | None = None) -> str:
    """A two-column text table of the main metrics (percentages)."""
    keys = keys or ["mIoU", "oIoU", "Pr@0.50", "Pr@0.60", "Pr@0.70", "Pr@0.80", "Pr@0.90", "N-acc", "T-acc"]
    rows = []
    for k in keys:
        v = metrics.get(k, math.nan)
        rows.append(f"{k:<10} {'n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:6.2f}'}")
    rows.append(f"{'samples':<10} {int(metrics.get('n', 0)):6d}")
    return "\n".join(rows)
