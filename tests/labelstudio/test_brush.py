from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.brush import brush_region, redact_rle, region_mask, textarea_region


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


def test_region_mask_reads_a_submitted_region():
    m = np.zeros((6, 8), bool)
    m[1:4, 2:7] = True
    value = brush_region(m, from_name="tag", to_name="image", label="object", score=1.0)["value"]
    assert np.array_equal(region_mask(value, 8, 6), m)
    with pytest.raises(ValueError, match="expected 9x6x4"):
        region_mask(value, 9, 6)
    with pytest.raises(ValueError, match="unsupported brush format"):
        region_mask({**value, "format": "png"}, 8, 6)
    with pytest.raises(ValueError, match="non-empty list"):
        region_mask({"format": "rle"}, 8, 6)
