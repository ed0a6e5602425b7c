"""Smart clicks and boxes of an interactive context -> SAM prompts in pixels (backend/labelstudio/sam_prompts.py),
the label of the refined region, and the labeling config's click and box controls."""

from __future__ import annotations

import math

import pytest

from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.sam_prompts import MAX_CLICKS, Click, PromptError, prompt_items, prompt_label, sam_prompts
from tests.fakes import INTERACTIVE_CONFIG, LABEL_CONFIG, keypoint_item, rectangle_item, textarea_item

SPEC = parse_label_config(INTERACTIVE_CONFIG)
W, H = 200, 100


def prompts(*items, w=W, h=H, spec=SPEC):
    return sam_prompts(spec, prompt_items(spec, {"result": list(items)}), w, h)


def test_config_lists_the_click_and_box_controls_of_the_mask_image():
    assert SPEC.prompt_controls == (("kp", "click", ("object", "circle", "other")),
                                    ("box", "box", ("object", "circle")))
    assert SPEC.mask_type == "brushlabels" and SPEC.brush_name == "tag"
    other = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/><BrushLabels name="m" toName="a">'
             '<Label value="x"/></BrushLabels><KeyPointLabels name="k" toName="b"><Label value="x"/></KeyPointLabels>'
             '<Rectangle name="r" toName="a"/><KeyPoint name="p" toName="a"/></View>')
    assert parse_label_config(other).prompt_controls == (("r", "box", ()), ("p", "click", ()))
    assert parse_label_config(LABEL_CONFIG).prompt_controls == ()


def test_percent_becomes_continuous_pixels_of_the_picture():
    p = prompts(keypoint_item(25, 50, w=W, h=H), keypoint_item(0, 100, w=W, h=H, rid="k2"),
                keypoint_item(100, 0, w=W, h=H, rid="k3"))
    assert p.clicks == (Click(50.0, 50.0, True), Click(0.0, 100.0, True), Click(200.0, 0.0, True))
    assert p.box is None and p.notes == ()


def test_negative_clicks_are_the_alt_clicks():
    p = prompts(keypoint_item(10, 10, w=W, h=H), keypoint_item(90, 90, positive=False, w=W, h=H, rid="k2"))
    assert [c.positive for c in p.clicks] == [True, False]
    item = keypoint_item(10, 10, w=W, h=H)
    del item["is_positive"]                     # a plain (not smart) keypoint: positive
    assert prompts(item).clicks[0].positive is True


def test_boxes_in_pixels_clipped_and_rotated():
    p = prompts(rectangle_item(10, 20, 30, 40, w=W, h=H))
    assert p.box == pytest.approx((20.0, 20.0, 80.0, 60.0))
    assert prompts(rectangle_item(90, 90, 30, 30, w=W, h=H)).box == pytest.approx((180.0, 90.0, 200.0, 100.0))
    # turned 90 degrees clockwise about its top-left corner (LS's rotation): the 60 x 40 px box hangs to the left
    p = prompts(rectangle_item(50, 20, 30, 40, rotation=90, w=W, h=H))
    assert p.box == pytest.approx((60.0, 20.0, 100.0, 80.0))
    # several boxes (LS sends every smart box of the label): the last one, said so
    p = prompts(rectangle_item(10, 20, 30, 40, w=W, h=H), rectangle_item(0, 0, 50, 50, w=W, h=H, rid="b2"))
    assert p.box == pytest.approx((0.0, 0.0, 100.0, 50.0)) and any("last one" in n for n in p.notes)


def test_items_of_another_image_or_control_are_left_out_with_a_note():
    items = prompt_items(SPEC, {"result": [
        keypoint_item(10, 10, w=W, h=H, to_name="other_image", rid="far"),
        keypoint_item(10, 10, w=W, h=H, from_name="not_a_control", rid="odd"),
        {**rectangle_item(1, 1, 5, 5, w=W, h=H), "from_name": "kp"},          # a box from the click control
        textarea_item("the red circle"),
        {"type": "brushlabels", "from_name": "tag", "to_name": "image", "value": {}},
        "not an item", None,
    ]})
    assert not items
    assert len(items.notes) == 3
    assert "image 'other_image'" in items.notes[0] and "'not_a_control'" in items.notes[1]
    assert "RectangleLabels" in items.notes[2]
    kept = prompt_items(SPEC, {"result": [keypoint_item(10, 10, w=W, h=H, to_name="elsewhere"),
                                          keypoint_item(20, 20, w=W, h=H, rid="k2")]})
    assert [i["id"] for i in kept.clicks] == ["k2"] and len(kept.notes) == 1
    item = keypoint_item(10, 10, w=W, h=H)
    del item["to_name"]                          # no to_name: the mask control's image
    assert prompt_items(SPEC, {"result": [item]}).clicks
    assert not prompt_items(parse_label_config(LABEL_CONFIG), {"result": [keypoint_item(1, 1, w=W, h=H)]})
    assert not prompt_items(SPEC, None) and not prompt_items(SPEC, {"result": "x"})
    # names that are no strings (a hand-made or hostile context): left out, never an exception
    odd = [{**keypoint_item(1, 1, w=W, h=H), "from_name": ["kp"]}, {**keypoint_item(1, 1, w=W, h=H), "from_name": {}},
           {**keypoint_item(1, 1, w=W, h=H), "to_name": {"a": 1}}, {**keypoint_item(1, 1, w=W, h=H), "type": None}]
    items = prompt_items(SPEC, {"result": odd})
    assert not items and len(items.notes) == 3


@pytest.mark.parametrize("item,fragment", [
    (keypoint_item(101, 50, w=W, h=H), "outside the picture"),
    (keypoint_item(-0.5, 50, w=W, h=H), "outside the picture"),
    (keypoint_item(math.nan, 50, w=W, h=H), "finite"),
    (keypoint_item(math.inf, 50, w=W, h=H), "finite"),
    (keypoint_item("10", 50, w=W, h=H), "must be a number"),
    (keypoint_item(True, 50, w=W, h=H), "must be a number"),
    ({**keypoint_item(10, 50, w=W, h=H), "is_positive": "false"}, "is_positive must be true or false"),
    ({**keypoint_item(10, 50, w=W, h=H), "value": None}, "no 'value'"),
    ({**keypoint_item(10, 50, w=W, h=H), "value": {"y": 5}}, "value.x must be a number"),
    (rectangle_item(10, 10, 0, 20, w=W, h=H), "no area"),
    (rectangle_item(10, 10, 20, -5, w=W, h=H), "no area"),
    (rectangle_item(120, 10, 20, 20, w=W, h=H), "outside the picture"),
    (rectangle_item(10, 10, 20, 20, rotation=math.nan, w=W, h=H), "value.rotation must be a finite"),
    # drawn on a picture of other proportions: the raw, un-rotated size of an EXIF-rotated photo, say
    (keypoint_item(10, 10, w=H, h=W), "drawn on a 100x200 picture, but the task's picture is 200x100"),
    ({**keypoint_item(10, 10, w=W, h=H), "original_width": 0}, "positive numbers"),
])
def test_bad_values_are_refused_with_a_clear_message(item, fragment):
    with pytest.raises(PromptError, match="^(click|box) ") as err:
        prompts(item)
    assert fragment in str(err.value)
    assert str(item["id"]) in str(err.value)


def test_a_scaled_copy_of_the_picture_is_accepted_and_too_many_clicks_are_not():
    assert prompts(keypoint_item(50, 50, w=2 * W, h=2 * H)).clicks == (Click(100.0, 50.0, True),)
    many = [keypoint_item(1, 1, w=W, h=H, rid=f"k{i}") for i in range(MAX_CLICKS + 1)]
    with pytest.raises(PromptError, match=f"at most {MAX_CLICKS}"):
        prompts(*many)


def test_label_of_the_region():
    # the last item's label when it is one of the mask control's labels
    p = prompts(keypoint_item(1, 1, label="object", w=W, h=H), keypoint_item(2, 2, label="circle", w=W, h=H, rid="2"))
    assert prompt_label(SPEC, p, "object") == "circle"
    # a label the mask control does not have ("other" is a KeyPointLabels label only): the sentence's, with a note
    p = prompts(keypoint_item(1, 1, label="other", w=W, h=H))
    assert prompt_label(SPEC, p, "circle") == "circle"
    assert any("'other'" in n and "<tag>" in n for n in p.notes)
    # no sentence either: the first label
    assert prompt_label(SPEC, p, None) == "object"
    item = keypoint_item(1, 1, w=W, h=H)
    item["value"] = {"x": 1, "y": 1}             # no label at all (a plain KeyPoint)
    assert prompt_label(SPEC, prompts(item), None) == "object"
