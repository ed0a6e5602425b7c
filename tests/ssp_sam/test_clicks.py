"""Clicks and boxes with the sentence (issue 18, model side): click simulation, SAM's prompts in the decoder, the
interactive predictor, click training and the click metrics."""

import random

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from ssp_sam.build import LoadedModel, build_model
from ssp_sam.clicks import Click, click_tensors, first_click, next_click, original_to_sam
from ssp_sam.data.synthetic import generate_sample
from ssp_sam.evaluate import click_metrics, evaluate_clicks, format_click_table
from ssp_sam.predictor import SSPSAMPredictor
from ssp_sam.tokenizer import load_tokenizer
from ssp_sam.train import config_from_preset, train


def _square(n=20, y0=5, x0=5, side=9):
    m = np.zeros((n, n), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


# ---------------------------------------------------------------------------------------------------- simulation
def test_first_click_is_the_deepest_point_of_the_object():
    c = first_click(_square())
    assert c == Click(9.0, 9.0, True)          # the centre of the 9x9 square at rows/cols 5..13
    assert first_click(np.zeros((8, 8), bool)) is None


def test_next_click_takes_the_larger_error_and_its_sign():
    gt = _square()
    missed = gt.copy()
    missed[5:14, 5:8] = False                 # a 9x3 strip missed: a positive click inside it
    c = next_click(missed, gt)
    assert c.positive and 5 <= c.x < 8 and gt[int(c.y), int(c.x)] and not missed[int(c.y), int(c.x)]
    extra = gt.copy()
    extra[0:5, 0:20] = True                   # a 5x20 band too many: deeper than nothing, a negative click
    c = next_click(extra, gt)
    assert not c.positive and c.y < 5
    assert next_click(gt, gt) is None


def test_the_picture_border_counts_as_a_boundary():
    gt = np.zeros((10, 10), bool)
    pred = np.zeros((10, 10), bool)
    pred[:, :4] = True                        # a false positive along the left border: its deepest column is 1 or 2,
    c = next_click(pred, gt)                  # not 3 (as if the region went on past the border)
    assert not c.positive and c.x in (1.0, 2.0)


def test_jittered_clicks_stay_deep_inside_the_error():
    gt = _square(40, 5, 5, 30)
    rng = random.Random(0)
    xs = {next_click(np.zeros_like(gt), gt, rng, jitter=0.7).x for _ in range(30)}
    assert len(xs) > 1 and all(12 <= x <= 28 for x in xs)


def test_frame_clicks_become_sam_pixels_and_shorter_lists_are_padded():
    coords, labels = click_tensors([[Click(0, 0, True), Click(31, 15, False)], []], grid=32, sam_size=64)
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1.0, 0.0], [-1.0, -1.0]]
    assert coords[0, 0].tolist() == [0.5, 0.5] and coords[0, 1].tolist() == [62.5, 30.5]   # cell centres, SAM px
    coords, labels = click_tensors([[], []], grid=32, sam_size=64)     # no click at all: one padding point each
    assert labels.tolist() == [[-1.0], [-1.0]]


def test_picture_coordinates_follow_sams_resize():
    """A continuous point on the picture lands at the same continuous spot of SAM's resized picture; SAM's prompt
    encoder adds 0.5 to a pixel coordinate, so the coordinate handed to it is that spot - 0.5."""
    hw = (300, 400)                           # ResizeLongestSide(64): 48 x 64
    assert ResizeLongestSide.get_preprocess_shape(*hw, 64) == (48, 64)
    xy = np.array([[0, 0], [400, 300], [100, 25]], np.float32)
    assert np.allclose(original_to_sam(xy, hw, 64), [[-0.5, -0.5], [63.5, 47.5], [15.5, 3.5]])


# ---------------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny():
    model = build_model("tiny", seed=0).eval()
    return model, load_tokenizer(model.spec)


def _inputs(model, tok, b=2):
    s = model.spec
    torch.manual_seed(0)
    emb = torch.randn(b, s.prompt_dim, s.sam_image_size // s.sam_patch_size, s.sam_image_size // s.sam_patch_size)
    clip = torch.randn(b, 3, s.clip_image_size, s.clip_image_size)
    return emb, clip, tok(["the red circle", "a square"][:b])


def test_sentence_alone_is_the_unchanged_computation(tiny):
    model, tok = tiny
    emb, clip, ids = _inputs(model, tok)
    with torch.no_grad():
        out = model(emb, clip, ids)
        again = model.decode_masks(emb, out.prompts)
    assert torch.equal(out.low_res_logits, again)
    assert out.image_embeddings is emb


def test_clicks_boxes_and_masks_change_the_mask_and_clicks_alone_are_plain_sam(tiny):
    model, tok = tiny
    emb, clip, ids = _inputs(model, tok)
    pts = click_tensors([[Click(3, 4, True)], [Click(10, 2, False)]], model.spec.frame_size,
                        model.spec.sam_image_size)
    with torch.no_grad():
        out = model(emb, clip, ids)
        with_clicks = model(emb, clip, ids, points=pts)
        box = model.decode_masks(emb, out.prompts, boxes=torch.tensor([[2.0, 2.0, 30.0, 30.0]] * 2))
        mask = model.decode_masks(emb, out.prompts, mask_input=out.low_res_logits)
        plain = model.decode_masks(emb, None, points=pts)
    for other in (with_clicks.low_res_logits, box, mask):
        assert other.shape == out.low_res_logits.shape and not torch.allclose(other, out.low_res_logits)
    # plain SAM is segment_anything's own decoder on the same prompt tokens (mask token 0)
    sparse, dense = model.sam.prompt_encoder(pts, None, None)
    with torch.no_grad():
        ref = torch.cat([model.sam.mask_decoder(emb[i:i + 1], model.sam.prompt_encoder.get_dense_pe(),
                                                sparse[i:i + 1], dense[i:i + 1], False)[0] for i in range(2)])
    assert torch.allclose(plain, ref, atol=1e-5)
    with pytest.raises(ValueError, match="no prompt"):
        model.decode_masks(emb, None)


def _predictor(model, tok):
    loaded = LoadedModel(model, tok, model.spec, "tiny-test", torch.device("cpu"), torch.float32)
    return SSPSAMPredictor(loaded)


def test_predict_interactive(tiny):
    model, tok = tiny
    pred = _predictor(model, tok)
    image = np.random.RandomState(0).randint(0, 255, (50, 70, 3)).astype(np.uint8)
    alone = pred.predict(image, "the red circle")
    same = pred.predict_interactive(image, "the red circle")
    assert np.array_equal(alone.mask, same.mask) and np.array_equal(alone.frame_logits, same.frame_logits)
    s = model.spec
    assert same.low_res_logits.shape == (1, 4 * s.sam_image_size // s.sam_patch_size,
                                         4 * s.sam_image_size // s.sam_patch_size)
    clicked = pred.predict_interactive(image, "the red circle", [[10, 20], [60, 40]], [1, 0],
                                       mask_input=same.low_res_logits)
    assert clicked.mask.shape == (50, 70) and not np.array_equal(clicked.frame_logits, same.frame_logits)
    boxed = pred.predict_interactive(image, None, box=[5, 5, 40, 30])
    assert boxed.mask.shape == (50, 70) and boxed.low_res_logits is not None
    if boxed.mask.any():
        ys, xs = np.nonzero(boxed.mask)           # without a sentence the box is the mask's own
        assert boxed.box_xyxy.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with pytest.raises(ValueError, match="needs a sentence, a click or a box"):
        pred.predict_interactive(image, "", points=[])
    with pytest.raises(ValueError, match="2 points but 1 labels"):
        pred.predict_interactive(image, None, [[1, 1], [2, 2]], [1])
    assert pred.image_cache.stats()["items"] == 1        # one picture, encoded once for all of it
    # the sentence's prompt tokens were computed once for the session (the click reused them), and reusing them
    # gives what a fresh predictor computes
    assert pred.prompt_cache.stats()["items"] == 1 and pred.prompt_cache.hits >= 1
    fresh = _predictor(model, tok).predict_interactive(image, "the red circle", [[10, 20], [60, 40]], [1, 0],
                                                       mask_input=same.low_res_logits)
    assert np.array_equal(fresh.frame_logits, clicked.frame_logits)


# ---------------------------------------------------------------------------------------------------- training
def test_click_training_trains_the_prompt_encoder_and_logs_the_chain_loss(tmp_path, one_thread):
    def run(click_sim):
        model = build_model("tiny", seed=0)
        start = {k: v.clone() for k, v in model.sam.prompt_encoder.state_dict().items()}
        cfg = config_from_preset("tiny", out_dir=str(tmp_path / str(click_sim)), click_sim=click_sim, max_steps=3,
                                 val_data="", save_checkpoints=False)
        res = train(cfg, model=model)
        moved = any(not torch.equal(start[k], v) for k, v in res.model.sam.prompt_encoder.state_dict().items())
        return res, moved

    res, moved = run(True)
    assert moved and res.history[-1]["train/clicks"] > 0
    res, moved = run(False)
    assert not moved and "train/clicks" not in res.history[-1]


# ---------------------------------------------------------------------------------------------------- metrics
def test_click_metrics_from_curves():
    curves = {"sentence+clicks": [[0.9, 0.9, 0.95], [0.2, 0.5, 0.86]],
              "clicks": [[0.0, 0.86, 0.91], [0.0, 0.1, 0.2]]}
    m = click_metrics(curves, report=(0, 1, 2), noc_thresholds=(0.85, 0.90), max_clicks=2)
    assert m["sentence/mIoU"] == pytest.approx(0.55) and m["sentence+clicks/IoU@2"] == pytest.approx(0.905)
    assert m["sentence+clicks/NoC@85"] == pytest.approx((0 + 2) / 2)       # the sentence alone reaches it: 0
    assert m["sentence+clicks/NoC@90"] == pytest.approx((0 + 2) / 2)       # never: the cap
    assert m["clicks/NoC@85"] == pytest.approx((1 + 2) / 2)
    assert m["clicks/NoC@90"] == pytest.approx((2 + 2) / 2)
    assert "NoC@85" in format_click_table(m)


def test_evaluate_clicks_on_scenes(tiny):
    model, tok = tiny
    data = [generate_sample(3, i) for i in range(6)]
    m = evaluate_clicks(model, tok, data, max_clicks=3, report=(0, 1, 3), batch_size=4)
    assert m["n"] == sum(bool(s.mask.any()) for s in data)
    assert m["clicks/IoU@0"] == 0.0
    for mode in ("sentence+clicks", "clicks"):
        for t in (85, 90):
            assert 0 <= m[f"{mode}/NoC@{t}"] <= 3
        assert all(0 <= m[f"{mode}/IoU@{k}"] <= 1 for k in (0, 1, 3))
