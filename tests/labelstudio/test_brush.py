from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.brush import brush_region, mask_to_rle, redact_rle, rle_to_mask, textarea_region


@pytest.mark.parametrize("h,w", [(1, 1), (48, 64), (97, 131)])
def test_rle_round_trip(h, w):
    rng = np.random.default_rng(h * w)
    m = rng.random((h, w)) > 0.6
    for variant in (m, m.astype(np.uint8), m.astype(np.uint8) * 255):
        rle = mask_to_rle(variant)
        assert all(isinstance(x, int) and 0 <= x <= 255 for x in rle)
        assert np.array_equal(rle_to_mask(rle, h, w), m)


def test_rle_alpha_is_255():
    from label_studio_sdk.converter.brush import decode_rle
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    flat = decode_rle(mask_to_rle(m)).reshape(4, 5, 4)
    assert set(np.unique(flat[..., 3])) == {0, 255}


def test_rle_wrong_size_is_rejected():
    rle = mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError):
        rle_to_mask(rle, 4, 5)
    with pytest.raises(ValueError):
        mask_to_rle(np.ones((2, 2, 2)))


def test_regions_and_redaction():
    m = np.zeros((6, 8), bool)
    m[2:4, 2:6] = True
    r = brush_region(m, from_name="tag", to_name="image", label="object", score=0.5)
    assert r["original_width"] == 8 and r["original_height"] == 6 and r["image_rotation"] == 0
    assert r["value"]["brushlabels"] == ["object"] and r["type"] == "brushlabels"
    t = textarea_region(["a b"], from_name="prompt", to_name="image")
    assert t["value"] == {"text": ["a b"]} and t["id"] != r["id"]
    red = redact_rle({"results": [{"result": [r, t]}]})
    assert red["results"][0]["result"][0]["value"]["rle"].startswith("<rle ")
