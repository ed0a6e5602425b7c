"""Reading pictures: the one implementation of image loading (EXIF orientation, modes, bit depths), of the size a
picture is displayed at, and of image content keys. PIL and NumPy only, so the serving side can use it without torch.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from .timing import stage


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")   # Pillow's modes of 16-bit grayscale files
SIXTEEN_BIT_WHITE = 65535


class ImageTooLarge(ValueError):
    """A picture has more pixels than allowed; found from its header, before the pixels are decoded."""


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise :class:`ImageTooLarge` when ``width x height`` exceeds ``max_pixels`` (None: no bound)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height:,} pixels, more than {max_pixels:,}")


def load_image(src, max_pixels: int | None = None) -> np.ndarray:
    """Any picture -> RGB uint8 (H, W, 3), EXIF orientation applied (as browsers and Label Studio display it).

    Accepts a path, raw bytes, a PIL image or an array. Grayscale, palette, RGBA/LA (alpha dropped), CMYK and
    16-bit / float images are converted to 8-bit RGB; 16-bit values are scaled by the type's range (value / 257, as
    browsers show them), never by the picture's own. With ``max_pixels`` a bigger picture raises
    :class:`ImageTooLarge` before its pixels are decoded.
    """
    if isinstance(src, np.ndarray):
        check_pixels(src.shape[1] if src.ndim > 1 else 1, src.shape[0], max_pixels)
        return _array_to_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        img = Image.open(io.BytesIO(src))
    elif isinstance(src, (str, Path)):
        img = Image.open(src)
    elif isinstance(src, Image.Image):
        img = src
    else:
        raise TypeError(f"cannot read an image from {type(src).__name__}")
    check_pixels(*img.size, max_pixels)                # Image.open has read the header only
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        return _array_to_rgb(np.asarray(img), white=SIXTEEN_BIT_WHITE)
    if img.mode == "F":
        return _array_to_rgb(np.asarray(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def image_size(src, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as browsers and Label Studio show the picture (EXIF orientation applied), read from the header
    of a path or bytes without decoding the pixels. With ``max_pixels`` a bigger picture raises
    :class:`ImageTooLarge`."""
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    check_pixels(w, h, max_pixels)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_digest(image: np.ndarray) -> str:
    """SHA-1 hex digest of an image array's pixels and shape: the content key of image caches."""
    h = hashlib.sha1(np.ascontiguousarray(image).data)
    h.update(str(image.shape).encode())
    return h.hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Content key of a picture file: ``file:`` + the SHA-1 of its bytes (decoding is deterministic, so equal bytes
    mean equal pixels). Cheaper than :func:`image_digest` of the decoded pixels, and known without decoding."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "file:" + h.hexdigest()


class ImageRef:
    """A picture known by its content key and its size as displayed (EXIF applied), decoded only when its pixels
    are needed: the predictor looks the key up in its embedding cache first, so a picture whose features are cached
    is never decoded.

    ``loader`` returns the RGB uint8 pixels (``load_image``'s contract); they are kept once decoded, for the life of
    this object (one request). ``shape`` is ``(H, W, 3)`` like the array it stands for.
    """

    __slots__ = ("key", "hw", "_loader", "_pixels")

    def __init__(self, key: str, hw: tuple[int, int], loader: Optional[Callable[[], np.ndarray]] = None,
                 pixels: Optional[np.ndarray] = None) -> None:
        if loader is None and pixels is None:
            raise ValueError("an ImageRef needs a loader or its pixels")
        self.key = key
        self.hw = (int(hw[0]), int(hw[1]))
        self._loader = loader
        self._pixels = pixels

    @classmethod
    def of(cls, image: np.ndarray) -> "ImageRef":
        """An RGB uint8 array, keyed by :func:`image_digest` of its pixels."""
        with stage("key"):
            return cls(image_digest(image), image.shape[:2], pixels=image)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hw, 3)

    @property
    def decoded(self) -> bool:
        return self._pixels is not None

    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            with stage("decode"):
                pixels = self._loader()
            if tuple(pixels.shape[:2]) != self.hw:
                raise ValueError(f"the picture decoded to {pixels.shape[1]}x{pixels.shape[0]}, its header says "
                                 f"{self.hw[1]}x{self.hw[0]}")
            self._pixels = pixels
        return self._pixels


def _to_uint8(arr: np.ndarray, white: int | None = None) -> np.ndarray:
    """Values -> uint8. ``white``: the value shown as 255 (65535 for 16-bit pictures; uint16/int16 arrays always);
    otherwise floats in [0, 1] are scaled by 255, and wider values by 65535 (or their maximum) only when some exceed
    255."""
    if arr.dtype == np.uint8:
        return arr
    if white is None and arr.dtype.kind in "ui" and arr.dtype.itemsize == 2:
        white = SIXTEEN_BIT_WHITE
    a = arr.astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if white is not None:
        a = a * (255.0 / max(float(white), top))
    elif np.issubdtype(arr.dtype, np.floating) and top <= 1.0:
        a = a * 255.0
    elif top > 255:
        a = a * (255.0 / (65535.0 if top <= 65535 else top))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _array_to_rgb(arr: np.ndarray, white: int | None = None) -> np.ndarray:
    arr = _to_uint8(np.asarray(arr), white)
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


__all__ = ["ImageTooLarge", "check_pixels", "load_image", "image_size", "image_digest", "file_digest", "ImageRef"]
