"""Reading pictures: the one implementation of image loading (EXIF orientation, modes, bit depths), of the size a
picture is displayed at, and of image content keys. PIL and NumPy only, so the serving side can use it without torch.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def load_image(src) -> np.ndarray:
    """Any picture -> RGB uint8 (H, W, 3), EXIF orientation applied (as browsers and Label Studio display it).

    Accepts a path, raw bytes, a PIL image or an array. Grayscale, palette, RGBA/LA (alpha dropped), CMYK and
    16-bit / float images are converted to 8-bit RGB.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        img = Image.open(io.BytesIO(src))
    elif isinstance(src, (str, Path)):
        img = Image.open(src)
    elif isinstance(src, Image.Image):
        img = src
    else:
        raise TypeError(f"cannot read an image from {type(src).__name__}")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def image_size(src) -> tuple[int, int]:
    """(width, height) as browsers and Label Studio show the picture (EXIF orientation applied), read from the header
    of a path or bytes without decoding the pixels."""
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_digest(image: np.ndarray) -> str:
    """SHA-1 hex digest of an image array's pixels and shape: the content key of image caches."""
    h = hashlib.sha1(np.ascontiguousarray(image).data)
    h.update(str(image.shape).encode())
    return h.hexdigest()


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if np.issubdtype(arr.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif a.size and a.max() > 255:  # 16-bit or wider: scale by the type's (or the data's) range
            a = a * (255.0 / (65535.0 if a.max() <= 65535 else a.max()))
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"image array must be (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.shape[2] != 3:
        raise ValueError(f"image array must have 1, 3 or 4 channels, got {arr.shape[2]}")
    return np.ascontiguousarray(arr)


__all__ = ["load_image", "image_size", "image_digest"]
