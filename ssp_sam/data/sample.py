"""The one record type every dataset yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One referring-segmentation example.

    image: uint8 (H, W, 3) RGB.  sentence: the referring expression.  mask: uint8 (H, W) in {0, 1}; all zeros for a
    no-target sentence.  box_xyxy: float (4,) enclosing box of the target(s) in pixels, or None when there is no
    target.  meta: free-form JSON-serialisable details (``kind``, ids, ...).
    """

    image: np.ndarray
    sentence: str
    mask: np.ndarray
    box_xyxy: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"Sample.image must be (H, W, 3), got {self.image.shape}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"Sample.mask shape {self.mask.shape} != image size {self.image.shape[:2]}")
        if self.box_xyxy is None and self.mask.any():
            self.box_xyxy = mask_to_box(self.mask)
        if self.box_xyxy is not None:
            self.box_xyxy = np.asarray(self.box_xyxy, dtype=np.float32).reshape(4)

    @property
    def no_target(self) -> bool:
        """True when the sentence refers to nothing in the image (empty mask)."""
        return not bool(self.mask.any())


def mask_to_box(mask: np.ndarray) -> np.ndarray | None:
    """Enclosing box (x0, y0, x1, y1) of the positive pixels, pixel-edge convention (x1 = last column + 1)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
