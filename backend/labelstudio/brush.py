"""Masks <-> Label Studio regions (BrushLabels RLE, BitmaskLabels PNG, TextArea).

The editor draws a mask region into an image of the picture's *natural* size (after EXIF orientation): a region's
mask must be of exactly that size, with ``original_width`` / ``original_height`` set to it.

* ``brushlabels``: ``value.rle``, the RLE of an RGBA image whose alpha channel is the mask (0/255); the codec is
  ``ssp_sam.data.masks`` (the bytes of label-studio-sdk's ``mask2rle``).
* ``bitmasklabels``: ``value.imageDataURL``, a ``data:image/png;base64,...`` PNG of "black pixels on a transparent
  background" (LS 1.23.2's ``BitmaskRegion``: the editor draws the PNG onto a canvas of its natural size and keeps
  the pixels whose alpha is not 0). Written here as a 1-bit palette PNG (index 0 transparent, index 1 opaque black):
  a 12 MP mask in about 12 ms and a few KB, where RGBA takes 180 ms. Read back from any PNG mode through its alpha.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from typing import Any, Mapping, Optional

import numpy as np

from ssp_sam.data.masks import brush_rle_to_mask, mask_to_brush_rle

MASK_TYPES = ("brushlabels", "bitmasklabels")
PNG_DATA_URL = "data:image/png;base64,"


def new_region_id() -> str:
    return uuid.uuid4().hex[:10]


def mask_region(mask: np.ndarray, *, from_name: str, to_name: str, label: Optional[str], score: float,
                kind: str = "brushlabels", region_id: Optional[str] = None) -> dict:
    """A predicted mask result item (``kind``: ``brushlabels`` or ``bitmasklabels``, the labeling config's mask
    control) for an (H, W) mask at the image's natural size."""
    h, w = int(mask.shape[0]), int(mask.shape[1])
    labels = [label] if label else []
    if kind == "brushlabels":
        value = {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": labels}
    elif kind == "bitmasklabels":
        value = {"imageDataURL": mask_to_png_data_url(mask), "bitmasklabels": labels}
    else:
        raise ValueError(f"unknown mask region type {kind!r} (one of {', '.join(MASK_TYPES)})")
    return {
        "id": region_id or new_region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
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


def mask_to_png_data_url(mask: np.ndarray) -> str:
    """An (H, W) mask as a BitmaskLabels ``imageDataURL``: a PNG of the same size, opaque black where the mask is
    set and transparent elsewhere."""
    from PIL import Image

    im = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 0, 0, 0])
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0, bits=1)
    return PNG_DATA_URL + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_url_to_mask(url: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a BitmaskLabels ``imageDataURL`` (pixels whose alpha is not 0, as the editor reads it);
    a ValueError with the reason for anything else, or a picture of another size."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith(PNG_DATA_URL):
        raise ValueError("imageDataURL must be a data:image/png;base64,... URL")
    try:
        raw = base64.b64decode(url[len(PNG_DATA_URL):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("imageDataURL is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format != "PNG":
                raise ValueError(f"imageDataURL holds a {im.format} picture, not a PNG")
            if im.size != (int(width), int(height)):
                raise ValueError(f"the bitmask is {im.size[0]}x{im.size[1]}, the image {width}x{height}")
            return np.asarray(im.convert("RGBA"))[..., 3] > 0
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError("imageDataURL does not decode as a PNG") from None


def region_mask(value: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of a submitted mask region's ``value`` (a brush ``rle``, or a bitmask ``imageDataURL``),
    checked against the image size. Raises a ValueError (``ssp_sam.data.masks.MaskDecodeError`` for an RLE) with the
    reason."""
    if "imageDataURL" in value:
        return png_data_url_to_mask(value.get("imageDataURL"), height, width)
    fmt = str(value.get("format") or "rle").lower()
    if fmt != "rle":
        raise ValueError(f"unsupported brush format {fmt!r}")
    return brush_rle_to_mask(value.get("rle"), height, width)


def region_labels(value: Mapping[str, Any]) -> list:
    """The labels of a mask region's ``value`` (``brushlabels`` or ``bitmasklabels``)."""
    for key in MASK_TYPES:
        labels = value.get(key)
        if isinstance(labels, list) and labels:
            return labels
    return []


def redact_rle(obj):
    """A deep copy of a JSON-like object with every ``rle`` list and bitmask data URL replaced by a short summary
    (for logs)."""
    if isinstance(obj, dict):
        return {k: (f"<rle {len(v)} ints>" if k == "rle" and isinstance(v, list) else
                    f"<png data URL, {len(v)} chars>" if k == "imageDataURL" and isinstance(v, str) else
                    redact_rle(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_rle(v) for v in obj]
    return obj
