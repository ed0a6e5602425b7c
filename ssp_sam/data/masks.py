"""Mask codecs: the one place masks are turned into bytes and back.

* 1-bit PNG: compact lossless storage (the corrections datastore's mask blobs).
* COCO RLE (``{"counts", "size"}``, list or compressed string): through ``pycocotools``.
* Brush RLE: the run-length format of Label Studio's BrushLabels regions and of its exports, read by the JSON-lines
  datasets, the correction worker and the backend's responses. Encoded and decoded with ``label-studio-sdk``'s
  reference codec (``label_studio_sdk.converter.brush``); the 32-bit header (the number of RGBA values) is checked
  against the expected size *before* decoding, so a crafted header cannot make the decoder allocate gigabytes.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np


class MaskDecodeError(ValueError):
    """Bytes or runs that do not decode to a mask of the expected size (the message says why)."""


# ----------------------------------------------------------------------------------------------------------------------
# PNG


def mask_to_png(mask: np.ndarray) -> bytes:
    """A 2-D mask (bool, 0/1 or 0/255) as a 1-bit PNG."""
    from PIL import Image

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    img = Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L").convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    """(H, W) bool from PNG (or any single-image format Pillow reads); > 0 is foreground."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")) > 0


# ----------------------------------------------------------------------------------------------------------------------
# COCO RLE


def coco_rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (``counts`` as a list or the compressed string, ``size`` [H, W]) -> uint8 (H, W) {0, 1}."""
    from pycocotools import mask as coco_mask

    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed counts: pycocotools compresses them first
        encoded = coco_mask.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    else:
        encoded = {"counts": counts.encode() if isinstance(counts, str) else counts, "size": [h, w]}
    if isinstance(counts, list) and sum(int(c) for c in counts) != h * w:
        raise MaskDecodeError(f"COCO RLE covers {sum(int(c) for c in counts)} pixels, expected {h * w}")
    return np.ascontiguousarray(coco_mask.decode(encoded), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Brush RLE (Label Studio)


def brush_rle_length(rle: Sequence[int]) -> int:
    """The number of RGBA values a brush RLE declares in its 32-bit header (read without decoding)."""
    if len(rle) < 4:
        raise MaskDecodeError("brush RLE is shorter than its 4-byte header")
    return int.from_bytes(bytes(int(b) & 0xFF for b in rle[:4]), "big")


def brush_rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Brush RLE (a list of bytes 0..255) -> (H, W) bool mask (alpha channel > 0) of exactly that size."""
    from label_studio_sdk.converter.brush import decode_rle

    if not isinstance(rle, (list, tuple)) or not rle:
        raise MaskDecodeError("brush RLE must be a non-empty list of integers")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in rle):
        raise MaskDecodeError("brush RLE has values outside 0..255")
    expected = int(height) * int(width) * 4
    declared = brush_rle_length(rle)
    if declared != expected:
        raise MaskDecodeError(f"brush RLE declares {declared} values, expected {width}x{height}x4 = {expected}")
    try:
        flat = np.asarray(decode_rle(list(rle)), dtype=np.uint8)
    except Exception as exc:  # truncated or malformed runs
        raise MaskDecodeError(f"undecodable brush RLE ({type(exc).__name__}: {exc})") from None
    if flat.size != expected:
        raise MaskDecodeError(f"brush RLE decodes to {flat.size} values, expected {expected}")
    return flat.reshape(int(height), int(width), 4)[:, :, 3] > 0


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool / 0-1 / 0-255 mask -> brush RLE of the 0/255 RGBA image (what the Label Studio editor draws)."""
    from label_studio_sdk.converter.brush import mask2rle

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    on = m > 0 if m.dtype == bool or m.max(initial=0) <= 1 else m > 127
    return [int(v) for v in mask2rle(np.ascontiguousarray(on, dtype=np.uint8) * 255)]


__all__ = ["MaskDecodeError", "mask_to_png", "png_to_mask", "coco_rle_to_mask", "brush_rle_length",
           "brush_rle_to_mask", "mask_to_brush_rle"]
