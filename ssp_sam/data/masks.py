"""Mask codecs: the one place masks are turned into bytes and back.

* 1-bit PNG: compact lossless storage (the corrections datastore's mask blobs).
* COCO RLE (``{"counts", "size"}``, list or compressed string): through ``pycocotools``.
* Brush RLE: the run-length format of Label Studio's BrushLabels regions and of its exports, read by the JSON-lines
  datasets, the correction worker and the backend's responses. Decoded with ``label-studio-sdk``'s reference codec
  (``label_studio_sdk.converter.brush.decode_rle``); the 32-bit header (the number of RGBA values) is checked against
  the expected size *before* decoding, so a crafted header cannot make the decoder allocate gigabytes. Encoded by a
  vectorised numpy twin of the SDK's ``mask2rle`` that writes the same bytes (the tests compare the two byte for byte).
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


# Written by hand: the SDK's encoder (label_studio_sdk.converter.brush.encode_rle) is a Python loop that appends every
# run to a string of '0'/'1' characters and parses it back eight characters at a time. Measured with bench/rle.py
# (docs/performance.md): 87 ms for a 12 MP blob mask and 4.2 s for a noisy one, against 3.7 ms and 0.17 s here (about
# 24x); the Rust package label-studio-brush-rle-rs writes the same bytes but took 0.54 s and 0.70 s (its time follows
# the 48 M RGBA values it is handed, not the runs). This is the same bit layout computed with numpy over whole arrays,
# and the tests compare it with the SDK's mask2rle byte for byte. Bit layout (thi-ng/rle-pack, as the SDK writes it):
#   header  32 bits: number of values (H*W*4) | 5 bits: word size - 1 (7) | 4 x 4 bits: run-length field sizes - 1
#           for the sizes [3, 4, 8, 16]
#   run     1 bit: repeated (a run of length 1 writes 0) | 2 bits: which size | length - 1 in that size | 8 bits: value
#           the SDK picks the smallest size that fits (1-8 -> 3 bits, 9-16 -> 4, 17-256 -> 8, else 16) and splits a
#           run longer than 65536 into 65536-long pieces, the last piece written with the 16-bit size whatever its length
#   end     zero bits up to the next byte boundary, and a whole zero byte when the stream already ends on one
_BRUSH_RLE_SIZES = (3, 4, 8, 16)
_BRUSH_RLE_MAX_PIECE = 1 << 16
_BRUSH_RLE_HEADER_BITS = 32 + 5 + 4 * len(_BRUSH_RLE_SIZES)


def _brush_rle_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run length 0..257 (257: any longer run, and the last piece of a split one): the code's fixed bits (the
    repeat flag and the size index, minus the 1 that the length field subtracts), its width and 64 - width."""
    lengths = np.arange(258)
    size_index = np.searchsorted(np.array([8, 16, 256]), lengths)  # the smallest field that holds length - 1
    widths = 1 + 2 + np.array(_BRUSH_RLE_SIZES)[size_index] + 8
    fixed = ((lengths > 1) << (widths - 1)) | (size_index << (widths - 3))
    return fixed - (1 << 8), widths, (64 - widths).astype(np.uint64)


_BRUSH_RLE_FIXED, _BRUSH_RLE_WIDTH, _BRUSH_RLE_ALIGN = _brush_rle_tables()


def _brush_rle_codes(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs (int64 lengths >= 1, uint8 values) -> each piece's code left-aligned in a uint64, and its width (int64)."""
    last_of_split = None
    if lengths.max() > _BRUSH_RLE_MAX_PIECE:  # split like the SDK: 65536-long pieces, then the rest (1..65536)
        pieces = (lengths - 1) // _BRUSH_RLE_MAX_PIECE + 1
        run = np.repeat(np.arange(lengths.size), pieces)
        last = np.cumsum(pieces) - 1                               # the index of each run's last piece
        remainder = lengths - (pieces - 1) * _BRUSH_RLE_MAX_PIECE
        lengths = np.full(run.size, _BRUSH_RLE_MAX_PIECE, np.int64)
        lengths[last] = remainder
        values = values[run]
        last_of_split = last[pieces > 1]
    index = np.minimum(lengths, 257)
    if last_of_split is not None:
        index[last_of_split] = 257                                 # the SDK writes it with the 16-bit field
    codes = lengths << 8                                           # (length - 1) << 8: the 1 is in the fixed bits
    codes |= values
    codes += _BRUSH_RLE_FIXED[index]
    codes = codes.view(np.uint64)
    codes <<= _BRUSH_RLE_ALIGN[index]
    return codes, _BRUSH_RLE_WIDTH[index]


def _pack_bits(header: int, codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The 53-bit header, then the left-aligned codes of those widths (14..27 bits), as bytes zero-padded like the
    SDK: it always appends 1..8 zero bits."""
    ends = np.cumsum(widths)
    ends += _BRUSH_RLE_HEADER_BITS
    starts = ends - widths
    total_bits = int(ends[-1])
    del ends
    word, offset = starts >> 6, (starts & 63).view(np.uint64)
    # No code is wider than 27 bits, so a code starts in every 64-bit word: ``word`` is 0, .., K-1 in order, and the
    # codes starting in one word are a contiguous slice. Codes never overlap, so OR-ing each slice gives the word.
    first = np.flatnonzero(word[1:] != word[:-1])
    first += 1
    out = np.zeros(total_bits // 64 + 2, np.uint64)
    out[: word[-1] + 1] = np.bitwise_or.reduceat(codes >> offset, np.concatenate(([0], first)))
    spill = np.flatnonzero(offset + widths.view(np.uint64) > 64)   # codes that end in the next word
    out[word[spill] + 1] |= codes[spill] << (np.uint64(64) - offset[spill])
    out[0] |= np.uint64(header << (64 - _BRUSH_RLE_HEADER_BITS))
    return out.astype(">u8").view(np.uint8)[: total_bits // 8 + 1]


def _encode_brush_rle(flat: np.ndarray) -> np.ndarray:
    """The SDK's bytes for the RGBA stream of ``flat`` (1-D uint8 values, or bool standing for 0/255) as uint8."""
    n = flat.size
    if n == 0:
        raise ValueError("mask has no pixels")
    if n * 4 >= 1 << 32:
        raise ValueError(f"mask has {n} pixels: a brush RLE holds fewer than 2**30")
    change = np.flatnonzero(flat[1:] != flat[:-1])                 # the last pixel of every run but the last
    lengths = np.empty(change.size + 1, np.int64)
    lengths[:-1] = change
    lengths[-1] = n - 1
    values = flat[lengths]
    lengths[1:] -= lengths[:-1].copy()
    lengths[0] += 1
    lengths *= 4                                                   # runs of pixels are runs of RGBA values x 4
    if values.dtype == bool:
        values = values.view(np.uint8) * np.uint8(255)
    codes, widths = _brush_rle_codes(lengths, values)
    header = (n * 4) << 21 | (8 - 1) << 16                         # values | word size - 1 | field sizes - 1
    for k, size in enumerate(_BRUSH_RLE_SIZES):
        header |= (size - 1) << (12 - 4 * k)
    return _pack_bits(header, codes, widths)


def encode_brush_rle(image: np.ndarray) -> np.ndarray:
    """Byte-identical to ``label_studio_sdk.converter.brush.mask2rle(image)`` for a 2-D uint8 image (each value
    repeated as the four RGBA channels), as a uint8 array."""
    a = np.asarray(image)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"image must be a 2-D uint8 array, got {a.dtype} of shape {a.shape}")
    return _encode_brush_rle(a.ravel())


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool / 0-1 / 0-255 mask -> brush RLE of the 0/255 RGBA image (what the Label Studio editor draws)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if m.dtype != bool:
        m = m > 0 if m.max(initial=0) <= 1 else m > 127
    return _encode_brush_rle(m.ravel()).tolist()


__all__ = ["MaskDecodeError", "mask_to_png", "png_to_mask", "coco_rle_to_mask", "brush_rle_length",
           "brush_rle_to_mask", "encode_brush_rle", "mask_to_brush_rle"]
