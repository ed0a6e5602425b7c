"""Official layout and JSON-lines datasets on tiny files written here."""

import json

import numpy as np
import pytest
from PIL import Image

from ssp_sam.data.datasets import JsonlDataset, OfficialRefDataset, image_key, load_dataset, write_jsonl
from ssp_sam.data.synthetic import generate_sample


def _official(tmp_path, name="refcoco"):
    img = np.zeros((6, 8, 3), np.uint8)
    img[..., 0] = 200
    (tmp_path / "train2014").mkdir()
    Image.fromarray(img).save(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg")
    (tmp_path / "masks" / name).mkdir(parents=True)
    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:6] = 1
    np.save(tmp_path / "masks" / name / "7.npy", m)
    np.save(tmp_path / "masks" / name / "8.npy", np.zeros((6, 8), np.uint8))
    rec = {"iid": 42, "bbox": [2, 1, 4, 2], "cat_id": 1, "refs": ["left thing", "red thing"], "mask_id": 7}
    empty = {"iid": 42, "bbox": [0, 0, 0, 0], "cat_id": 1, "refs": ["nothing here"], "mask_id": 8}
    (tmp_path / "anns").mkdir()
    (tmp_path / "anns" / f"{name}.json").write_text(json.dumps({"train": [rec], "val": [rec, empty]}))
    return m


def test_official_layout(tmp_path):
    m = _official(tmp_path)
    train = OfficialRefDataset(tmp_path, "unc", "train", seed=0)
    assert len(train) == 1                       # one item per object
    sentences = {train[0].sentence for _ in range(30)}
    assert sentences == {"left thing", "red thing"}  # a random sentence per load
    val = OfficialRefDataset(tmp_path, "refcoco", "val")
    assert len(val) == 3                         # one item per sentence
    s = val[1]
    assert s.sentence == "red thing" and np.array_equal(s.mask, m)
    assert s.box_xyxy.tolist() == [2, 1, 6, 3]   # COCO xywh -> xyxy
    assert s.image.shape == (6, 8, 3) and s.meta["iid"] == 42
    assert val[2].box_xyxy is None and val[2].mask.sum() == 0
    ds = load_dataset(f"official:{tmp_path}:refcoco:val")
    assert len(ds) == 3
    assert len({image_key(val[i]) for i in range(3)}) == 1  # three sentences of one image share its key
    with pytest.raises(KeyError):
        OfficialRefDataset(tmp_path, "refcoco", "testA")
    with pytest.raises(ValueError):
        OfficialRefDataset(tmp_path, "imagenet", "val")


def test_jsonl_roundtrip_and_mask_formats(tmp_path):
    samples = [generate_sample(0, i) for i in range(3)]
    path = write_jsonl(samples, tmp_path)
    ds = load_dataset(str(path))
    assert isinstance(ds, JsonlDataset) and len(ds) == 3
    for a, b in zip(samples, (ds[i] for i in range(3))):
        assert a.sentence == b.sentence and np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert image_key(ds[0]) != image_key(ds[1])

    # Label Studio brush RLE and COCO RLE masks, and a no-target line
    from label_studio_sdk.converter.brush import encode_rle

    m = np.zeros((4, 5), np.uint8)
    m[1:3, 1:4] = 1
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "x.png")
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = m * 255
    brush = {"rle": [int(v) for v in encode_rle(rgba.ravel())], "height": 4, "width": 5}
    col = m.T.ravel()  # COCO counts run over the column-major order, starting with zeros
    counts, val, run = [], 0, 0
    for v in col:
        if v != val:
            counts.append(run)
            val, run = v, 0
        run += 1
    counts.append(run)
    lines = [{"image": "x.png", "sentence": "brush", "mask": brush},
             {"image": "x.png", "sentence": "coco", "mask": {"counts": counts, "size": [4, 5]}},
             {"image": "x.png", "sentence": "none", "mask": None}]
    (tmp_path / "own.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    own = JsonlDataset(tmp_path / "own.jsonl")
    assert np.array_equal(own[0].mask, m) and np.array_equal(own[1].mask, m)
    assert own[0].box_xyxy.tolist() == [1, 1, 4, 3]
    assert own[2].mask.sum() == 0 and own[2].box_xyxy is None and own[2].meta["kind"] == "none"
    assert len({image_key(own[i]) for i in range(3)}) == 1
    (tmp_path / "bad.jsonl").write_text('{"sentence": "no image"}\n')
    with pytest.raises(ValueError, match="image"):
        JsonlDataset(tmp_path / "bad.jsonl")


def test_load_dataset_errors():
    with pytest.raises(ValueError):
        load_dataset("imagenet")
    with pytest.raises(ValueError):
        load_dataset("synthetic:3:colour=red")
    assert len(load_dataset("synthetic:3:seed=4:domain=novel")) == 3


def test_load_dataset_kind_mix():
    """``kinds=`` sets the sentence-kind mix of a synthetic training set; a bad mix is refused with a clear message."""
    only_none = load_dataset("synthetic:6:seed=1:kinds=none=1.0")
    assert {only_none[i].meta["kind"] for i in range(6)} == {"none"}
    assert all(not only_none[i].mask.any() for i in range(6))
    with pytest.raises(ValueError, match="kinds must read"):
        load_dataset("synthetic:3:kinds=attr")
    with pytest.raises(ValueError, match="unknown sentence kinds"):
        load_dataset("synthetic:3:kinds=colour=1")
