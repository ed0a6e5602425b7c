from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.brush import mask_region, redact_rle, region_mask, textarea_region
from tests.payloads import bitmask_data_url


def test_regions_and_redaction():
    m = np.zeros((6, 8), bool)
    m[2:4, 2:6] = True
    r = mask_region(m, from_name="tag", to_name="image", label="object", score=0.5)
    assert r["original_width"] == 8 and r["original_height"] == 6 and r["image_rotation"] == 0
    assert r["value"]["brushlabels"] == ["object"] and r["type"] == "brushlabels"
    t = textarea_region(["a b"], from_name="prompt", to_name="image")
    assert t["value"] == {"text": ["a b"]} and t["id"] != r["id"]
    red = redact_rle({"results": [{"result": [r, t]}]})
    assert red["results"][0]["result"][0]["value"]["rle"].startswith("<rle ")


def test_region_mask_reads_a_submitted_region():
    m = np.zeros((6, 8), bool)
    m[1:4, 2:7] = True
    value = mask_region(m, from_name="tag", to_name="image", label="object", score=1.0)["value"]
    assert np.array_equal(region_mask(value, 8, 6), m)
    with pytest.raises(ValueError, match="expected 9x6x4"):
        region_mask(value, 9, 6)
    with pytest.raises(ValueError, match="unsupported brush format"):
        region_mask({**value, "format": "png"}, 8, 6)
    with pytest.raises(ValueError, match="non-empty list"):
        region_mask({"format": "rle"}, 8, 6)


def test_bitmask_regions_decode_to_the_same_mask():
    import base64
    import io

    from PIL import Image

    from backend.labelstudio.brush import mask_region, png_data_url_to_mask

    rng = np.random.default_rng(0)
    m = rng.random((37, 53)) > 0.6
    r = mask_region(m, from_name="tag", to_name="image", label="object", score=0.5, kind="bitmasklabels")
    assert r["type"] == "bitmasklabels" and (r["original_width"], r["original_height"]) == (53, 37)
    assert set(r["value"]) == {"imageDataURL", "bitmasklabels"} and r["value"]["bitmasklabels"] == ["object"]
    url = r["value"]["imageDataURL"]
    # read as the browser does: the picture at the natural size, the mask where a pixel is not transparent (and black)
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA")
    px = np.asarray(im)
    assert im.size == (53, 37) and np.array_equal(px[..., 3] > 0, m) and not px[..., :3].any()
    assert np.array_equal(png_data_url_to_mask(url, 37, 53), m)
    assert np.array_equal(region_mask(r["value"], 53, 37), m)
    assert np.array_equal(region_mask({"imageDataURL": bitmask_data_url(m), "bitmasklabels": []}, 53, 37), m)
    assert redact_rle(r)["value"]["imageDataURL"].startswith("<png data URL")
    brush = mask_region(m, from_name="tag", to_name="image", label="object", score=0.5)    # the default: a brush RLE
    assert brush["type"] == "brushlabels" and brush["value"]["format"] == "rle"
    assert np.array_equal(region_mask(brush["value"], 53, 37), m)
    with pytest.raises(ValueError, match="unknown mask region type"):
        mask_region(m, from_name="tag", to_name="image", label="object", score=0.5, kind="polygonlabels")


@pytest.mark.parametrize("url,fragment", [
    (None, "data:image/png;base64"),
    ("data:image/jpeg;base64,AAAA", "data:image/png;base64"),
    ("data:image/png;base64,%%%", "not valid base64"),
    ("data:image/png;base64," + "QUJD", "does not decode as a PNG"),
])
def test_bad_bitmask_values_are_refused(url, fragment):
    with pytest.raises(ValueError, match=fragment):
        region_mask({"imageDataURL": url}, 4, 3)


def test_a_bitmask_of_another_size_is_refused():
    from backend.labelstudio.brush import mask_to_png_data_url

    with pytest.raises(ValueError, match="the bitmask is 5x4, the image 4x3"):
        region_mask({"imageDataURL": mask_to_png_data_url(np.ones((4, 5), bool))}, 4, 3)
