"""The fast paths of the model library: fused attention (SDPA) against the eager reference, torch.compile with its
fallback, stage timings, pictures known by content key (``ImageRef``) and one computation per picture in flight."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from ssp_sam import timing
from ssp_sam.build import LoadedModel, build_model, compile_encoders
from ssp_sam.images import ImageRef, file_digest, image_digest
from ssp_sam.modeling.attention import SDPAAttention, use_sdpa
from ssp_sam.predictor import ByteLRU, SSPSAMPredictor
from ssp_sam.tokenizer import load_tokenizer


def _model(seed: int = 0):
    model = build_model("tiny", seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():                 # segment_anything zero-initialises them: make the bias matter
        if isinstance(m, Attention) and m.use_rel_pos:
            m.rel_pos_h.data = torch.randn(m.rel_pos_h.shape, generator=g)
            m.rel_pos_w.data = torch.randn(m.rel_pos_w.shape, generator=g)
    return model


def _inputs(model, batch: int = 2):
    s = model.spec
    g = torch.Generator().manual_seed(1)
    sam = torch.randn(batch, 3, s.sam_image_size, s.sam_image_size, generator=g)
    clip = torch.randn(batch, 3, s.clip_image_size, s.clip_image_size, generator=g)
    ids = load_tokenizer(s)(["the red circle on the left", "a square"][:batch])
    return sam, clip, ids


def _encode(model, sam, clip, ids):
    with torch.no_grad():
        words, sentence = model.encode_text(ids)
        return [model.encode_image(sam), model.encode_clip_image(clip), words, sentence]


def test_sdpa_matches_the_eager_encoders():
    model = _model()
    inputs = _inputs(model)
    use_sdpa(model, False)
    assert not any(isinstance(m, SDPAAttention) for m in model.modules()) and not model.clip.sdpa
    eager = _encode(model, *inputs)
    use_sdpa(model, True)
    assert sum(isinstance(m, SDPAAttention) for m in model.modules()) == 2       # windowed and global blocks
    assert model.clip.sdpa and model.clip.model.config._attn_implementation == "sdpa"
    fused = _encode(model, *inputs)
    for name, a, b in zip(("sam", "clip image", "words", "sentence"), eager, fused):
        assert a.abs().max() > 0.1
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, float((a - b).abs().max()))
    # the rel-pos bias really takes part: without it the SAM embedding differs
    for m in model.modules():
        if isinstance(m, Attention):
            m.use_rel_pos = False
    assert not torch.allclose(_encode(model, *inputs)[0], fused[0], atol=1e-3)


def test_sdpa_state_dict_is_unchanged_and_gradients_agree():
    model = _model()
    keys = list(model.state_dict())
    use_sdpa(model, True)
    assert list(model.state_dict()) == keys
    sam = _inputs(model)[0]
    grads = []
    for enabled in (False, True):
        use_sdpa(model, enabled)
        model.zero_grad()
        model.sam.image_encoder(sam).square().mean().backward()
        grads.append([p.grad.clone() for p in model.sam.image_encoder.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_sdpa_runs_under_bf16_autocast():
    model = _model()
    use_sdpa(model, True)
    sam, clip, ids = _inputs(model)
    ref = _encode(model, sam, clip, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _encode(model, sam, clip, ids)
    for a, b in zip(ref, low):
        assert torch.isfinite(b).all() and torch.allclose(a, b.float(), atol=0.25, rtol=0.1)


def test_compile_with_a_working_backend_keeps_the_outputs():
    model = _model()
    sam, clip, ids = _inputs(model, batch=1)
    ref = _encode(model, sam, clip, ids)
    done = compile_encoders(model, backend="eager")
    assert done == {"SAM image encoder": True, "CLIP image tower": True}
    for a, b in zip(ref, _encode(model, sam, clip, ids)):
        assert torch.allclose(a, b, atol=1e-6)
    assert list(model.state_dict()) == list(build_model("tiny").state_dict())


def test_compile_failure_falls_back_to_eager_with_a_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    model = _model()
    sam, clip, ids = _inputs(model, batch=1)
    ref = _encode(model, sam, clip, ids)
    with caplog.at_level(logging.WARNING, logger="ssp_sam.build"):
        done = compile_encoders(model, backend=broken_backend)
    assert done == {"SAM image encoder": False, "CLIP image tower": False}
    assert sum("running it eagerly" in r.getMessage() for r in caplog.records) == 2
    for a, b in zip(ref, _encode(model, sam, clip, ids)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- stage timings
def test_stages_record_only_inside_a_collector():
    with timing.stage("decode"):
        pass
    assert timing.active() is None
    with timing.collect() as t:
        with timing.stage("decode"):
            time.sleep(0.01)
        with timing.stage("decode"):
            pass
        with timing.stage("rle"):
            pass
    assert t.counts == {"decode": 2, "rle": 1} and t.seconds["decode"] >= 0.01
    assert t.server_timing(total=0.5).startswith("decode;dur=") and t.server_timing(total=0.5).endswith(
        "total;dur=500.00")
    seen = []
    with timing.collect():                    # another thread has no collector: records nothing
        th = threading.Thread(target=lambda: seen.append(timing.active()))
        th.start()
        th.join()
    assert seen == [None]


def _predictor(**kw) -> SSPSAMPredictor:
    model = build_model("tiny", seed=0)
    return SSPSAMPredictor(LoadedModel(model, load_tokenizer(model.spec), model.spec, "tiny-test",
                                       torch.device("cpu"), torch.float32), **kw)


def test_predictor_stages_cold_and_warm():
    pred = _predictor()
    img = np.random.RandomState(0).randint(0, 255, (40, 60, 3)).astype(np.uint8)
    with timing.collect() as cold:
        pred.predict(img, "the red circle")
    assert set(cold.seconds) == {"key", "preprocess", "sam_encoder", "clip_vision", "clip_text", "decoder",
                                 "upsample"}
    with timing.collect() as warm:
        pred.predict(ImageRef(image_digest(img), (40, 60), loader=lambda: pytest.fail("decoded")), "a square")
    assert set(warm.seconds) == {"clip_text", "decoder", "upsample"}


# ---------------------------------------------------------------------- pictures known by content
def test_image_ref_is_decoded_only_on_a_cache_miss(tmp_path):
    pred = _predictor()
    img = np.random.RandomState(0).randint(0, 255, (40, 60, 3)).astype(np.uint8)
    from PIL import Image
    Image.fromarray(img).save(tmp_path / "a.png")
    key = file_digest(tmp_path / "a.png")
    assert key.startswith("file:") and key == file_digest(str(tmp_path / "a.png"))
    loads = []

    def ref():
        return ImageRef(key, (40, 60), loader=lambda: loads.append(1) or img)

    assert not pred.has_image(key)
    first = pred.predict(ref(), "the red circle")
    assert loads == [1] and pred.has_image(key)
    again = pred.predict(ref(), "the red circle")
    assert loads == [1]                                          # cached: never decoded again
    np.testing.assert_array_equal(first.mask, again.mask)
    np.testing.assert_allclose(pred.predict(img, "the red circle").frame_logits, first.frame_logits, atol=1e-6)
    assert ref().shape == (40, 60, 3)
    bad = ImageRef("file:other", (41, 60), loader=lambda: img)
    with pytest.raises(ValueError, match="header says 60x41"):
        pred.predict(bad, "x")


def test_a_picture_at_the_sam_size_is_upsampled_once():
    from torch.nn import functional as F
    from ssp_sam.transforms import frame_to_original

    logits = torch.randn(32, 32)
    two_steps = F.interpolate(F.interpolate(logits[None, None], (64, 64), mode="bilinear", align_corners=False)
                              [..., :64, :48], (64, 48), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(frame_to_original(logits, (64, 48), 64), two_steps)          # the identity resize skipped
    assert frame_to_original(logits, (100, 75), 64).shape == (100, 75)


def test_byte_lru_membership_counts_nothing():
    class Blob:
        nbytes = 10
    lru = ByteLRU(100)
    lru.put("a", Blob())
    assert "a" in lru and "b" not in lru
    assert (lru.hits, lru.misses) == (0, 0)


def test_one_computation_per_picture_in_flight():
    """A prewarm running when the first sentence arrives: the sentence waits for it; the picture is encoded once."""
    pred = _predictor()
    calls = []
    real = pred.model.encode_image

    def slow_encode(x):
        calls.append(1)
        time.sleep(0.3)
        return real(x)
    pred.model.encode_image = slow_encode
    img = np.random.RandomState(3).randint(0, 255, (30, 30, 3)).astype(np.uint8)
    ref = ImageRef.of(img)
    warm = threading.Thread(target=pred.prewarm, args=(ref,))
    warm.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pred.has_image(ref.key)                                # in flight counts as known
    p = pred.predict(ImageRef(ref.key, (30, 30), loader=lambda: pytest.fail("decoded")), "the thing")
    warm.join()
    assert calls == [1] and p.mask.shape == (30, 30)
    assert pred.prewarm(ref) is False and calls == [1]


def test_a_failed_computation_lets_the_waiter_compute_it():
    pred = _predictor()
    real = pred.model.encode_image
    state = {"n": 0}

    def flaky(x):
        state["n"] += 1
        if state["n"] == 1:
            time.sleep(0.2)
            raise RuntimeError("CUDA out of memory (fake)")
        return real(x)
    pred.model.encode_image = flaky
    img = np.random.RandomState(4).randint(0, 255, (30, 30, 3)).astype(np.uint8)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, pred.prewarm, img)))
    t.start()
    while state["n"] == 0:
        time.sleep(0.01)
    p = pred.predict(img, "the thing")
    t.join()
    assert errors and state["n"] == 2 and p.mask.shape == (30, 30)


def test_text_cache_is_bounded_in_bytes():
    pred = _predictor(text_cache_bytes=10_000)          # a tiny-model sentence is 77 x 32 floats + ids: ~10.5 KB
    img = np.zeros((20, 20, 3), np.uint8)
    first = pred.predict(img, "sentence 0")
    for i in range(1, 6):
        pred.predict(img, f"sentence {i}")
        assert pred.text_cache.nbytes <= 10_000
    assert len(pred.text_cache) == 0                    # each one is over the bound: none kept, all answered
    roomy = _predictor(text_cache_bytes=50_000)
    for i in range(10):
        roomy.predict(img, f"sentence {i}")
        assert roomy.text_cache.nbytes <= 50_000
    assert 0 < len(roomy.text_cache) < 10 and roomy.text_cache.evictions > 0
    np.testing.assert_allclose(roomy.predict(img, "sentence 0").frame_logits, first.frame_logits, atol=1e-6)
