"""Masks <-> Label Studio regions (BrushLabels RLE, TextArea).

The editor decodes a brush RLE into an RGBA image of the picture's *natural* size (after EXIF orientation) and reads
its alpha channel: a region's mask must be 0/255 of exactly that size, with ``original_width`` / ``original_height``
set to it. The codec itself is ``ssp_sam.data.masks``.
"""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Optional

import numpy as np

from ssp_sam.data.masks import brush_rle_to_mask, mask_to_brush_rle


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_region(mask: np.ndarray, *, from_name: str, to_name: str, label: Optional[str], score: float,
                 region_id: Optional[str] = None) -> dict:
    """A predicted ``brushlabels`` result item for an (H, W) mask at the image's natural size."""
    h, w = int(mask.shape[0]), int(mask.shape[1])
    return {
        "id": region_id or new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label] if label else []},
        "score": float(score),
        "readonly": False,
    }


def textarea_region(texts: list[str], *, from_name: str, to_name: str, region_id: Optional[str] = None) -> dict:
    """A ``textarea`` result item (echoes the sentence a prediction was made for)."""
    return {
        "id": region_id or new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": list(texts)},
    }


def region_mask(value: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of a submitted brush region's ``value`` (``format: rle``), checked against the image size.
    Raises ``ssp_sam.data.masks.MaskDecodeError`` (a ValueError) with the reason."""
    fmt = str(value.get("format") or "rle").lower()
    if fmt != "rle":
        raise ValueError(f"unsupported brush format {fmt!r}")
    return brush_rle_to_mask(value.get("rle"), height, width)


def redact_rle(obj):
    """A deep copy of a JSON-like object with every ``rle`` list replaced by a short summary (for logs)."""
    if isinstance(obj, dict):
        return {k: (f"<rle {len(v)} ints>" if k == "rle" and isinstance(v, list) else redact_rle(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_rle(v) for v in obj]
    return obj
