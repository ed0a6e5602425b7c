"""Interactive correction through the Flask app: a sentence, then smart clicks (Alt: negative) or a box, as Label
Studio 1.23.2 sends them; the session's sentence and previous mask; the label of the refined region; bad input; and
BitmaskLabels answers. The fake predictor (tests/fakes.py) makes masks from the prompts it is given."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from backend.labelstudio.brush import png_data_url_to_mask
from ssp_sam.data.masks import brush_rle_to_mask
from tests.fakes import (INTERACTIVE_CONFIG, LABEL_CONFIG, FakePredictor, keypoint_item, png_bytes, rectangle_item,
                         task, textarea_item)
from tests.serving.test_api import predict_body

W, H = 64, 48
BITMASK_CONFIG = INTERACTIVE_CONFIG.replace("BrushLabels", "BitmaskLabels")


def interactive(client, tasks, *items, config=INTERACTIVE_CONFIG):
    r = client.post("/predict", json=predict_body(tasks, context={"result": list(items)}, label_config=config))
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert len(body["results"]) == 1 and isinstance(body["results"][0]["result"], list)
    return body


def regions(body, kind="brushlabels"):
    return [x for x in body["results"][0]["result"] if x["type"] == kind]


def mask_of(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    if region["type"] == "bitmasklabels":
        return png_data_url_to_mask(region["value"]["imageDataURL"], h, w)
    return brush_rle_to_mask(region["value"]["rle"], h, w)


@pytest.fixture
def picture(ls_media):
    return ls_media("a.png", png_bytes(W, H))


def test_sentence_and_a_negative_click_in_one_call(client, predictor, picture):
    body = interactive(client, [task(1, picture)], textarea_item("the red circle"),
                       keypoint_item(50, 50, positive=False, w=W, h=H))
    (call,) = predictor.interactive_calls
    assert call["sentence"] == "the red circle"
    assert call["points"] == [[32.0, 24.0]] and call["labels"] == [0.0] and call["box"] is None
    assert call["mask_input"] is None                       # INTERACTIVE_MASK_PROMPT is off by default
    (region,) = regions(body)
    assert (region["from_name"], region["to_name"], region["original_width"], region["original_height"]) == (
        "tag", "image", W, H)
    assert region["value"]["brushlabels"] == ["object"]     # the click's label, a label of the mask control
    # the centre quarter (the sentence's fake mask) with a hole around the negative click
    mask = mask_of(region)
    assert mask[13, 17] and not mask[24, 32]
    (text,) = regions(body, "textarea")
    assert text["value"]["text"] == ["the red circle"] and text["from_name"] == "prompt"
    assert predictor.calls == []                             # not the sentence path


def test_the_sentence_call_then_click_calls_as_label_studio_sends_them(make_app, predictor, picture, store):
    """LS sends the typed sentence alone, then each click with every smart click so far and no sentence: the
    session lends the sentence, and (with INTERACTIVE_MASK_PROMPT) the previous mask."""
    client = make_app(INTERACTIVE_MASK_PROMPT="true").test_client()
    t = task(1, picture)
    body = interactive(client, [t], textarea_item("the red circle"))
    assert predictor.calls == [["the red circle"]] and predictor.interactive_calls == []   # today's sentence path
    assert regions(body)[0]["value"]["brushlabels"] == ["circle"]
    k1 = keypoint_item(10, 10, positive=False, w=W, h=H, rid="k1")
    body = interactive(client, [t], k1)
    sentence_only, first = predictor.interactive_calls
    # the first click refines the sentence's own mask: computed first, then given as the dense prompt
    assert (sentence_only["sentence"], sentence_only["points"]) == ("the red circle", None)
    assert first["sentence"] == "the red circle" and first["labels"] == [0.0]
    assert first["mask_input"][0, 0, 0] == 1
    assert regions(body)[0]["value"]["brushlabels"] == ["object"]
    assert regions(body, "textarea")[0]["value"]["text"] == ["the red circle"]
    k2 = keypoint_item(90, 90, w=W, h=H, rid="k2")
    interactive(client, [t], k1, k2)
    third = predictor.interactive_calls[-1]
    assert third["sentence"] == "the red circle" and third["labels"] == [0.0, 1.0]
    assert third["mask_input"][0, 0, 0] == 2                # the previous answer's low-res logits
    # the suggestion was accepted: LS deleted the smart clicks, the next one starts a new session (plain SAM)
    interactive(client, [t], keypoint_item(30, 30, w=W, h=H, rid="k3"))
    fresh = predictor.interactive_calls[-1]
    assert fresh["sentence"] is None and fresh["mask_input"] is None and fresh["points"] == [[pytest.approx(19.2), pytest.approx(14.4)]]
    # click-refined masks are not recorded as the model's answer to the sentence
    assert [p["sentence"] for p in store.predictions] == ["the red circle"]


def test_a_click_reaching_another_worker_takes_the_sentence_from_the_datastore(make_app, predictor, picture, store):
    """Two workers (or replicas) share the datastore but not their sessions: the click that reaches the worker which
    never saw the sentence combines with the latest sentence the model answered for the task (recorded there)."""
    first, second = make_app().test_client(), make_app().test_client()
    t = task(1, picture)
    interactive(first, [t], textarea_item("the red circle"))
    assert [p["sentence"] for p in store.predictions] == ["the red circle"]
    interactive(second, [t], keypoint_item(10, 10, positive=False, w=W, h=H))
    assert predictor.interactive_calls[-1]["sentence"] == "the red circle"
    # a task the model never answered a sentence for: plain SAM
    other = task(2, picture)
    interactive(second, [other], keypoint_item(10, 10, w=W, h=H))
    assert predictor.interactive_calls[-1]["sentence"] is None
    # a broken datastore: the click still gets its answer (plain SAM), never an error
    store.find_prediction = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("database is locked"))
    body = interactive(make_app().test_client(), [t], keypoint_item(10, 10, w=W, h=H))
    assert predictor.interactive_calls[-1]["sentence"] is None and regions(body)


def test_sessions_without_the_mask_prompt_and_per_task(client, predictor, ls_media):
    a, b = ls_media("a.png", png_bytes(W, H)), ls_media("b.png", png_bytes(W, H, color=(0, 90, 0)))
    interactive(client, [task(1, a)], textarea_item("the red circle"))
    interactive(client, [task(1, a)], keypoint_item(10, 10, w=W, h=H))
    interactive(client, [task(1, a)], keypoint_item(10, 10, w=W, h=H), keypoint_item(20, 20, w=W, h=H, rid="k2"))
    assert [c["sentence"] for c in predictor.interactive_calls] == ["the red circle"] * 2
    assert all(c["mask_input"] is None for c in predictor.interactive_calls)
    interactive(client, [task(2, b)], keypoint_item(10, 10, w=W, h=H))          # another task: its own session
    assert predictor.interactive_calls[-1]["sentence"] is None


def test_box_only_is_plain_sam_and_a_task_sentence_is_used(client, predictor, picture):
    body = interactive(client, [task(1, picture)], rectangle_item(25, 25, 50, 50, label="circle", w=W, h=H))
    call = predictor.interactive_calls[-1]
    assert call["sentence"] is None and call["points"] is None and call["box"] == [16.0, 12.0, 48.0, 36.0]
    (region,) = regions(body)
    assert region["value"]["brushlabels"] == ["circle"] and regions(body, "textarea") == []
    assert mask_of(region)[12:36, 16:48].all() and mask_of(region).sum() == 32 * 24
    # a task that has its own (single) sentence: the clicks refine it
    interactive(client, [task(2, picture, "the thing on the left")], keypoint_item(50, 50, w=W, h=H))
    assert predictor.interactive_calls[-1]["sentence"] == "the thing on the left"


def test_sentence_only_answers_are_unchanged(make_app, ls_media):
    """The same sentence call gives the same answer with the interactive config as with the plain one (region ids
    aside), through the sentence path: no interactive prediction."""
    pictures = ls_media("a.png", png_bytes(W, H))
    answers = []
    for config in (LABEL_CONFIG, INTERACTIVE_CONFIG):
        predictor = FakePredictor()
        client = make_app(predictor_factory=lambda c, ckpt, p=predictor: p).test_client()
        body = interactive(client, [task(1, pictures)], textarea_item("the thing on the left"), config=config)
        assert predictor.interactive_calls == []
        for r in body["results"][0]["result"]:
            r.pop("id")
        answers.append(json.dumps(body, sort_keys=True))
    assert answers[0] == answers[1]


def test_clicks_on_an_exif_rotated_jpeg_land_where_the_browser_shows_them(client, predictor, ls_media):
    """A JPEG stored 64x48 with EXIF orientation 6 is shown (and loaded) as 48x64: the percentages are of that."""
    raw = np.zeros((48, 64, 3), np.uint8)
    raw[2:10, 50:62] = (255, 0, 0)                           # a red block at the stored picture's top right
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert shown.shape == (64, 48, 3)
    ys, xs = np.nonzero(shown[..., 0] > 200)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2     # the block's centre as shown
    url = ls_media("rot.jpg", buf.getvalue())
    body = interactive(client, [task(1, url)], keypoint_item(100 * cx / 48, 100 * cy / 64, w=48, h=64))
    (call,) = predictor.interactive_calls
    assert call["points"] == [[pytest.approx(cx, abs=1e-3), pytest.approx(cy, abs=1e-3)]]
    x, y = (int(v) for v in call["points"][0])
    assert shown[y, x, 0] > 200                              # on the red block of the picture the model was given
    (region,) = regions(body)
    assert (region["original_width"], region["original_height"]) == (48, 64) and mask_of(region)[y, x]
    # the same click placed on the stored (un-rotated) size: refused, not put elsewhere
    body = interactive(client, [task(1, url)], keypoint_item(10, 10, w=64, h=48))
    assert body["results"][0]["result"] == [] and "drawn on a 64x48 picture" in body["message"]


@pytest.mark.parametrize("items,fragment", [
    ([keypoint_item(150, 10, w=W, h=H)], "outside the picture"),
    ([rectangle_item(10, 10, 0, 10, w=W, h=H)], "no area"),
    ([keypoint_item(10, 10, w=W, h=H, to_name="elsewhere")], "type a sentence"),     # nothing left: as no prompt
    ([{**keypoint_item(10, 10, w=W, h=H), "is_positive": "yes"}], "is_positive"),
    ([keypoint_item(10, 10, w=H, h=W)], "drawn on a 48x64 picture"),
])
def test_bad_input_gets_one_empty_result_and_a_clear_message(client, picture, items, fragment):
    body = interactive(client, [task(1, picture)], *items)
    res = body["results"][0]
    assert res["result"] == [] and fragment in res["message"] and fragment in body["message"]
    assert "Traceback" not in json.dumps(body)


def test_notes_for_left_out_items_and_foreign_labels(client, predictor, picture):
    body = interactive(client, [task(1, picture)], keypoint_item(50, 50, w=W, h=H, to_name="elsewhere", rid="far"),
                       keypoint_item(50, 50, label="other", w=W, h=H), textarea_item("the red circle"))
    (region,) = regions(body)
    assert region["value"]["brushlabels"] == ["circle"]      # "other" is not a mask label: the sentence's
    assert "image 'elsewhere'" in body["message"] and "'other'" in body["message"]


def test_model_failure_and_a_model_without_clicks(make_app, picture):
    class Broken(FakePredictor):
        def predict_interactive(self, *a, **kw):
            raise RuntimeError("CUDA out of memory at /secret/path")

    client = make_app(predictor_factory=lambda c, ckpt: Broken()).test_client()
    body = interactive(client, [task(1, picture)], keypoint_item(10, 10, w=W, h=H))
    assert body["results"][0]["result"] == [] and body["message"] == "prediction failed: RuntimeError"
    assert "/secret/path" not in json.dumps(body)

    class Old(FakePredictor):
        predict_interactive = None

    client = make_app(predictor_factory=lambda c, ckpt: Old()).test_client()
    body = interactive(client, [task(1, picture)], keypoint_item(10, 10, w=W, h=H))
    assert "takes no clicks" in body["message"]


def test_no_object_found_for_the_clicks(client, picture):
    body = interactive(client, [task(1, picture)], keypoint_item(50, 50, positive=False, w=W, h=H))
    assert body["results"][0]["result"] == [] and "no object found for these clicks" in body["message"]


def test_bitmask_config_answers_bitmask_regions(client, picture, predictor):
    """A <BitmaskLabels> config: the same masks as PNG data URLs at the picture's natural size, in the interactive,
    the sentence and the batch answers."""
    body = interactive(client, [task(1, picture)], textarea_item("the red circle"),
                       keypoint_item(50, 50, positive=False, w=W, h=H), config=BITMASK_CONFIG)
    brush = interactive(client, [task(1, picture)], textarea_item("the red circle"),
                        keypoint_item(50, 50, positive=False, w=W, h=H))
    (bitmask,) = regions(body, "bitmasklabels")
    assert set(bitmask["value"]) == {"imageDataURL", "bitmasklabels"} and bitmask["value"]["bitmasklabels"] == [
        "object"]
    assert bitmask["value"]["imageDataURL"].startswith("data:image/png;base64,")
    assert np.array_equal(mask_of(bitmask), mask_of(regions(brush)[0]))
    r = client.post("/predict", json=predict_body([task(1, picture, "the thing on the left"), task(2, picture, "x")],
                                                  label_config=BITMASK_CONFIG))
    for res in r.get_json()["results"]:
        (region,) = [x for x in res["result"] if x["type"] != "textarea"]
        assert region["type"] == "bitmasklabels" and region["from_name"] == "tag"
    left = mask_of([x for x in r.get_json()["results"][0]["result"] if x["type"] == "bitmasklabels"][0])
    assert left[:, :W // 2].all() and not left[:, W // 2:].any()


def test_with_the_real_predictor_the_session_mask_reaches_sams_dense_prompt(make_app, ls_media):
    """The tiny model (untrained) behind the app: a typed sentence, then two clicks as LS sends them. Each click call
    is answered by ``predict_interactive`` on the task's picture, the second one with the first one's low-res logits
    as ``mask_input``; the answers are well-formed regions or one empty result."""
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.predictor import SSPSAMPredictor

    real = SSPSAMPredictor(load_model(ModelConfig(variant="tiny", device="cpu")))
    seen = []
    original = real.predict_interactive

    def recording(image, sentence=None, **kw):
        pred = original(image, sentence, **kw)
        seen.append((sentence, kw.get("mask_input"), pred.low_res_logits))
        return pred

    real.predict_interactive = recording
    client = make_app(predictor_factory=lambda c, ckpt: real, INTERACTIVE_MASK_PROMPT="true").test_client()
    picture = ls_media("a.png", png_bytes(W, H, color=(10, 200, 40)))
    t = task(1, picture)
    interactive(client, [t], textarea_item("the green square"))
    k1, k2 = keypoint_item(30, 40, w=W, h=H), keypoint_item(70, 60, positive=False, w=W, h=H, rid="k2")
    bodies = [interactive(client, [t], k1), interactive(client, [t], k1, k2)]
    (s0, in0, out0), (s1, in1, out1), (s2, in2, _) = seen
    assert s0 == s1 == s2 == "the green square" and in0 is None
    assert in1 is out0 and in2 is out1 and out1.ndim == 3
    for body in bodies:
        res = body["results"][0]
        assert set(res) >= {"result", "score", "model_version"}
        for region in regions(body):
            assert (region["original_width"], region["original_height"]) == (W, H) and mask_of(region).shape == (H, W)
