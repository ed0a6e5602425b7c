"""The mask codecs (ssp_sam.data.masks): PNG, COCO RLE through pycocotools, brush RLE with its header checked, and
the hand-written brush RLE encoder byte for byte against label-studio-sdk's (property tests with Hypothesis)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from ssp_sam.data.masks import (MaskDecodeError, brush_rle_length, brush_rle_to_mask, coco_rle_to_mask,
                                encode_brush_rle, mask_to_brush_rle, mask_to_png, png_to_mask)


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


# ----------------------------------------------------------------------------------------------------------------------
# The hand-written brush RLE encoder against the SDK's reference encoder (label_studio_sdk.converter.brush.mask2rle):
# the same bytes, and the SDK's decoder gives the mask back.

BRUSH_RLE_EXAMPLES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow])


def _assert_same_as_sdk(mask):
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    m = np.asarray(mask) > 0
    ours = mask_to_brush_rle(mask)
    assert ours == mask2rle(m.astype(np.uint8) * 255)                      # byte for byte
    assert np.array_equal(decode_rle(ours), np.repeat(m.ravel().astype(np.uint8) * 255, 4))
    assert np.array_equal(brush_rle_to_mask(ours, *m.shape), m)


def _drawn_mask(h, w, kind, density, seed):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.random((h, w)) < density
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 5)):                                    # discs and rectangles
        cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), rng.integers(1, h + 1), rng.integers(1, w + 1)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1 if rng.random() < 0.5 else \
            (abs(yy - cy) <= ry // 2) & (abs(xx - cx) <= rx // 2)
    if kind == "blobs+noise":
        m ^= rng.random((h, w)) < density / 10
    return m


@BRUSH_RLE_EXAMPLES
@given(h=st.integers(1, 70), w=st.integers(1, 70), kind=st.sampled_from(["noise", "blobs", "blobs+noise"]),
       density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["bool", "0/1", "0/255"]))
def test_brush_rle_matches_the_sdk_on_random_masks(h, w, kind, density, seed, dtype):
    m = _drawn_mask(h, w, kind, density, seed)
    m = m if dtype == "bool" else m.astype(np.uint8) * (1 if dtype == "0/1" else 255)
    _assert_same_as_sdk(m)
    _assert_same_as_sdk(m.T)                                               # a view that is not C-contiguous


@BRUSH_RLE_EXAMPLES
@given(h=st.integers(1, 40), w=st.integers(1, 40), levels=st.integers(1, 256), seed=st.integers(0, 2**32 - 1))
def test_encode_brush_rle_matches_mask2rle_on_any_uint8_image(h, w, levels, seed):
    from label_studio_sdk.converter.brush import mask2rle

    rng = np.random.default_rng(seed)
    image = rng.choice(np.arange(256, dtype=np.uint8), size=levels, replace=False)[rng.integers(0, levels, (h, w))]
    assert encode_brush_rle(image).tolist() == mask2rle(image)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 2), (2, 1), (3, 5), (1, 257), (257, 1), (31, 17), (64, 64)])
def test_brush_rle_matches_the_sdk_on_empty_full_and_single_pixels(h, w):
    _assert_same_as_sdk(np.zeros((h, w), bool))
    _assert_same_as_sdk(np.ones((h, w), bool))
    for y, x in {(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)}:
        one = np.zeros((h, w), bool)
        one[y, x] = True
        _assert_same_as_sdk(one)
        _assert_same_as_sdk(~one)


# Pixel runs whose RGBA runs (x4) sit on either side of each of the SDK's length-field limits (8, 16, 256) and of its
# 65536-value pieces, alone and between other runs.
RUN_LIMITS = [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768, 32769, 49153, 70000]


@pytest.mark.parametrize("run", RUN_LIMITS)
def test_brush_rle_matches_the_sdk_at_the_run_length_limits(run):
    for before, after in ((0, 0), (1, 0), (0, 3), (5, 2)):
        row = np.zeros((1, before + run + after), bool)
        row[0, before:before + run] = True
        _assert_same_as_sdk(row)
        _assert_same_as_sdk(~row)
        _assert_same_as_sdk(row.T)                                         # N x 1


def test_brush_rle_matches_the_sdk_on_a_12_megapixel_mask():
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    m = _drawn_mask(3000, 4000, "blobs", 0, seed=7)
    m[100:2900:97, 13:3990:89] ^= True                                     # specks: many short runs too
    ours = mask_to_brush_rle(m)
    assert ours == mask2rle(m.astype(np.uint8) * 255)
    assert np.array_equal(decode_rle(ours).reshape(3000, 4000, 4)[:, :, 3] > 0, m)


def test_brush_rle_refuses_a_mask_without_pixels():
    with pytest.raises(ValueError, match="no pixels"):
        mask_to_brush_rle(np.zeros((0, 5), bool))
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_brush_rle(np.zeros((2, 2), np.int64))
