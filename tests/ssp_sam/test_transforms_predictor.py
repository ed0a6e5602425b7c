"""Pre/post-processing (EXIF, modes, frames), the predictor's caches and batching, and the predict CLI."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ssp_sam.build import LoadedModel, build_model
from ssp_sam.predictor import ByteLRU, SSPSAMPredictor
from ssp_sam.tokenizer import load_tokenizer
from ssp_sam.images import load_image
from ssp_sam.transforms import (box_from_clip_frame, box_to_clip_frame, clip_input, frame_to_original, mask_to_frame,
                                resized_hw, sam_input)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _png(img, format="JPEG", exif=exif.tobytes())
    assert load_image(data).shape == (40, 20, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
def test_modes_become_rgb_uint8(mode):
    img = Image.new("RGB", (9, 7), (200, 100, 50)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.full((7, 9), 60000, dtype=np.uint16))
    arr = load_image(img)
    assert arr.shape == (7, 9, 3) and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() > 200  # 16-bit range scaled, not clipped to 255 garbage


def test_sam_input_pads_bottom_right():
    img = np.full((30, 60, 3), 255, np.uint8)
    x = sam_input(img, 64)
    assert x.shape == (3, 64, 64)
    assert x[:, 40:, :].abs().sum() == 0 and x[:, :32, :].abs().sum() > 0


def test_clip_input_centres_like_the_official_code():
    img = np.zeros((240, 320, 3), np.uint8)
    x, meta = clip_input(img, 224, "center")
    assert meta.resized_hw == (168, 224) and meta.pad_left_top == (0, 28)
    box = box_to_clip_frame([32, 24, 96, 72], meta)
    back = box_from_clip_frame(box.tolist(), meta, (240, 320))
    assert np.allclose(back, [32, 24, 96, 72], atol=1e-3)


def test_mask_frames_roundtrip_at_original_resolution():
    h, w = 90, 150
    mask = np.zeros((h, w), np.uint8)
    mask[20:60, 30:100] = 1
    frame = mask_to_frame(mask, 128, 64)
    nh, nw = resized_hw(h, w, 128)
    assert frame.shape == (64, 64) and frame[nh // 2:, :].sum() == 0  # padding stays empty
    logits = frame * 20 - 10
    full = frame_to_original(logits, (h, w), 128) > 0
    assert full.shape == (h, w)
    inter = (full.numpy() & mask.astype(bool)).sum()
    union = (full.numpy() | mask.astype(bool)).sum()
    assert inter / union > 0.9


def test_byte_lru_never_exceeds_bound():
    class Blob:
        def __init__(self, n):
            self.nbytes = n
    lru = ByteLRU(100)
    for i in range(10):
        lru.put(i, Blob(30))
        assert lru.nbytes <= 100
    assert len(lru) == 3 and lru.get(9) is not None and lru.get(0) is None
    lru.put("huge", Blob(1000))
    assert lru.get("huge") is None and lru.evictions == 7


def _predictor(**kw):
    model = build_model("tiny", seed=0)
    loaded = LoadedModel(model, load_tokenizer(model.spec), model.spec, "tiny-test", torch.device("cpu"),
                         torch.float32)
    return SSPSAMPredictor(loaded, **kw)


def test_predictor_batch_equals_single_and_caches():
    pred = _predictor()
    a = np.random.RandomState(0).randint(0, 255, (50, 70, 3)).astype(np.uint8)
    b = np.random.RandomState(1).randint(0, 255, (33, 20, 3)).astype(np.uint8)
    batch = pred.predict_batch([(a, "the red circle"), (b, "a square"), (a, "a square")], batch_size=2)
    assert pred.image_cache.stats()["items"] == 2  # the shared image was encoded once
    single = pred.predict(b, "a square")
    assert np.allclose(single.frame_logits, batch[1].frame_logits, atol=1e-5)  # batch size changes sum order
    assert batch[0].mask.shape == (50, 70) and batch[1].mask.shape == (33, 20)
    for p in batch:
        assert 0.0 <= p.score <= 1.0 and p.box_xyxy.shape == (4,)
        assert p.no_target == (not p.mask.any())


def test_predictor_no_target_rule():
    pred = _predictor(threshold=1e9)  # nothing passes: no target, empty mask, score 0
    p = pred.predict(np.zeros((20, 20, 3), np.uint8), "the green star")
    assert p.no_target and not p.mask.any() and p.score == 0.0


def test_predictor_cache_bound_evicts():
    pred = _predictor(cache_bytes=30_000)
    for i in range(5):
        pred.predict(np.full((10, 10, 3), i, np.uint8), "x")
        assert pred.image_cache.nbytes <= 30_000
    assert pred.image_cache.evictions > 0


def test_mask_to_clip_grid_follows_the_clip_placement():
    from ssp_sam.transforms import mask_to_clip_grid
    img = np.zeros((32, 64, 3), np.uint8)
    mask = np.zeros((32, 64), np.uint8)
    mask[:, :32] = 1                                     # left half of the picture
    _, meta = clip_input(img, 64, "center")              # resized 32x64, pasted at top 16
    grid = mask_to_clip_grid(mask, meta, 16).reshape(4, 4)
    assert grid[0].sum() == 0 and grid[3].sum() == 0     # padding rows
    assert torch.allclose(grid[1:3, :2], torch.ones(2, 2)) and grid[1:3, 2:].sum() == 0


# ---------------------------------------------------------------------- wrong images, silently
def _gradient16(lo: int, hi: int) -> np.ndarray:
    return np.tile(np.linspace(lo, hi, 256).round().astype(np.uint16), (4, 1))


@pytest.mark.reliability
@pytest.mark.parametrize("lo,hi", [(0, 65535), (0, 255), (1000, 4095)])
@pytest.mark.parametrize("via", ["png", "pillow I;16", "pillow I", "array"])
def test_16bit_grayscale_scales_by_the_type_range(lo, hi, via, reliability):
    """Browsers show a 16-bit PNG as value / 257; so must the model see it, whatever the picture's own range."""
    g = _gradient16(lo, hi)
    src = {"png": lambda: _png(Image.fromarray(g)), "pillow I;16": lambda: Image.fromarray(g),
           "pillow I": lambda: Image.fromarray(g.astype(np.int32)), "array": lambda: g}[via]()
    arr = load_image(src)
    expected = np.rint(g / 257.0).astype(np.uint8)
    assert arr.dtype == np.uint8 and arr.shape == (4, 256, 3)
    assert np.array_equal(arr[..., 0], expected) and np.array_equal(arr[..., 2], expected)
    if (lo, hi) == (0, 255) and via == "png":
        reliability("Images", "a dark 16-bit grayscale PNG (values 0..255 of 65535)", "load_image",
                    f"8-bit values {arr.min()}..{arr.max()} (value / 257, as a browser shows it)")


@pytest.mark.reliability
@pytest.mark.parametrize("h,w", [(1, 4000), (4000, 1), (2, 3000)])
def test_extreme_aspect_ratios_give_a_mask_of_the_right_shape(h, w, reliability):
    assert min(resized_hw(h, w, 1024)) >= 1
    _, meta = clip_input(np.zeros((h, w, 3), np.uint8), 224)
    assert min(meta.resized_hw) >= 1
    p = _predictor().predict(np.full((h, w, 3), 128, np.uint8), "a thin line")
    assert p.mask.shape == (h, w) and p.box_xyxy.shape == (4,) and np.isfinite(p.score)
    reliability("Images", f"a {w}x{h} image (extreme aspect ratio)", "the predictor (tiny model)",
                f"a {w}x{h} mask, score {p.score:.3f}")


def test_resized_size_is_unchanged_for_normal_images():
    from segment_anything.utils.transforms import ResizeLongestSide
    for h, w in [(480, 640), (1, 2), (3, 4000), (999, 1000), (4000, 3), (1024, 1024), (7, 9)]:
        assert resized_hw(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    img = np.random.RandomState(0).randint(0, 255, (37, 53, 3)).astype(np.uint8)
    ref = torch.as_tensor(ResizeLongestSide(64).apply_image(img)).permute(2, 0, 1).float()
    assert torch.equal(sam_input(img, 64)[:, :ref.shape[1], :ref.shape[2]],
                       (ref - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1))
                       / torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1))
