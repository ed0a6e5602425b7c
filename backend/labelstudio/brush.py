"""Masks <-> Label Studio regions (BrushLabels RLE).

The frontend decodes RLE into an ImageData of the image's *natural* size (after EXIF orientation), reading alpha:
masks must be uint8 0/255 of exactly that size (protocol doc §7).
"""

from __future__ import annotations

import uuid
from typing import Iterable, Optional

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool/0-1/0-255 mask -> LS brush RLE (list of ints 0..255)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    m = (m > 0).astype(np.uint8) * 255 if m.dtype == bool or m.max(initial=0) <= 1 else (m > 127).astype(np.uint8) * 255
    return [int(v) for v in mask2rle(np.ascontiguousarray(m, dtype=np.uint8))]


def rle_to_mask(rle: Iterable[int], height: int, width: int) -> np.ndarray:
    """LS brush RLE -> (H, W) bool mask (alpha channel > 0)."""
    flat = decode_rle(list(rle))
    if flat.size != height * width * 4:
        raise ValueError(f"RLE holds {flat.size // 4} pixels, expected {height}x{width}={height * width}")
    return np.reshape(flat, (height, width, 4))[:, :, 3] > 0


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_region(mask: np.ndarray, *, from_name: str, to_name: str, label: Optional[str], score: float,
                 region_id: Optional[str] = None) -> dict:
    h, w = int(mask.shape[0]), int(mask.shape[1])
    return {
        "id": region_id or new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label] if label else []},
        "score": float(score),
        "readonly": False,
    }


def textarea_region(texts: list[str], *, from_name: str, to_name: str, region_id: Optional[str] = None) -> dict:
    return {
        "id": region_id or new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": list(texts)},
    }


def redact_rle(obj):
    """A deep copy of a JSON-like object with every ``rle`` list replaced by a short summary (for logs)."""
    if isinstance(obj, dict):
        return {k: (f"<rle {len(v)} ints>" if k == "rle" and isinstance(v, list) else redact_rle(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_rle(v) for v in obj]
    return obj
