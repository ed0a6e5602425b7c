"""The mask codecs (ssp_sam.data.masks): PNG, COCO RLE through pycocotools, brush RLE with its header checked."""

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from ssp_sam.data.masks import (MaskDecodeError, brush_rle_length, brush_rle_to_mask, coco_rle_to_mask,
                                mask_to_brush_rle, mask_to_png, png_to_mask)


def _blob(h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), bool)
    m[5:20, 10:40] = True
    m ^= rng.random((h, w)) < 0.05
    return m


def test_png_roundtrip_is_lossless_and_compact():
    m = np.zeros((480, 640), bool)
    m[100:300, 200:500] = True
    data = mask_to_png(m)
    assert len(data) < 2000 and np.array_equal(png_to_mask(data), m)
    r = _blob()
    assert np.array_equal(png_to_mask(mask_to_png(r)), r)


def test_coco_rle_compressed_and_list_counts():
    m = _blob().astype(np.uint8)
    enc = coco_mask.encode(np.asfortranarray(m))            # compressed counts (bytes), as COCO files store them
    assert np.array_equal(coco_rle_to_mask({"counts": enc["counts"].decode(), "size": enc["size"]}), m)
    assert coco_rle_to_mask({"counts": [1, 2, 1], "size": [2, 2]}).tolist() == [[0, 1], [1, 0]]  # column-major
    with pytest.raises(MaskDecodeError, match="covers 3 pixels"):
        coco_rle_to_mask({"counts": [1, 2], "size": [2, 2]})


@pytest.mark.parametrize("h,w", [(1, 1), (37, 53), (64, 1), (1, 97)])
def test_brush_rle_roundtrip(h, w):
    for m in (np.zeros((h, w), bool), np.ones((h, w), bool), _blob(h, w) if h > 20 and w > 40 else np.eye(h, w) > 0):
        rle = mask_to_brush_rle(m)
        assert brush_rle_length(rle) == h * w * 4
        assert np.array_equal(brush_rle_to_mask(rle, h, w), m)
    assert np.array_equal(brush_rle_to_mask(mask_to_brush_rle(np.full((h, w), 255, np.uint8)), h, w),
                          np.ones((h, w), bool))


def test_brush_rle_header_is_checked_before_decoding():
    rle = mask_to_brush_rle(_blob())
    with pytest.raises(MaskDecodeError, match="expected 20x10x4"):
        brush_rle_to_mask(rle, 10, 20)
    bomb = [255, 255, 255, 255] + rle[4:]                   # declares 2^32 - 1 values: refused without decoding
    with pytest.raises(MaskDecodeError, match="declares 4294967295"):
        brush_rle_to_mask(bomb, 37, 53)
    with pytest.raises(MaskDecodeError, match="outside 0..255"):
        brush_rle_to_mask([0, 0, 0, 4, 300], 1, 1)
    with pytest.raises(MaskDecodeError):
        brush_rle_to_mask(rle[:8], 37, 53)                 # truncated runs


def test_brush_rle_is_the_editors_rgba_with_alpha_255():
    from label_studio_sdk.converter.brush import decode_rle

    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    for variant in (m, m.astype(np.uint8), m.astype(np.uint8) * 255):
        flat = decode_rle(mask_to_brush_rle(variant)).reshape(4, 5, 4)
        assert set(np.unique(flat[..., 3])) == {0, 255} and np.array_equal(flat[..., 3] > 0, m)
    with pytest.raises(ValueError):
        mask_to_brush_rle(np.ones((2, 2, 2)))
