from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.label_config import LabelConfigError, parse_label_config
from backend.labelstudio.prompts import collect_prompts, context_sentences, label_for_sentence, region_sentence
from tests.fakes import LABEL_CONFIG


def test_parse_recommended_config():
    spec = parse_label_config(LABEL_CONFIG)
    assert (spec.image_name, spec.image_value_key, spec.brush_name, spec.prompt_name) == ("image", "image", "tag",
                                                                                          "prompt")
    assert spec.labels == ("object", "circle")
    assert spec.images == (("image", "image"),) and spec.image_data_key("image") == "image"


def test_image_of_a_region_is_found_by_to_name():
    cfg = ('<View><Image name="left" value="$a"/><Image name="right" value="$b"/><BrushLabels name="m" toName="right">'
           '<Label value="x"/></BrushLabels></View>')
    spec = parse_label_config(cfg)
    assert spec.image_value_key == "b" and spec.image_data_key("left") == "a" and spec.image_data_key(None) == "b"


def test_textarea_for_another_object_is_not_the_prompt():
    cfg = ('<View><Image name="a" value="$a"/><Text name="t" value="$t"/>'
           '<TextArea name="notes" toName="t"/><BrushLabels name="b" toName="a"><Label value="x"/></BrushLabels></View>')
    assert parse_label_config(cfg).prompt_name is None


@pytest.mark.parametrize("cfg,fragment", [
    ("", "missing"), ("<View>", "parse"),
    ('<View><Image name="a" value="$a"/><RectangleLabels name="r" toName="a"><Label value="x"/></RectangleLabels>'
     '</View>', "BrushLabels"),
    ('<View><Image name="a" value="http://x/y.png"/><BrushLabels name="b" toName="a"><Label value="x"/>'
     '</BrushLabels></View>', "task data"),
])
def test_unusable_configs(cfg, fragment):
    with pytest.raises(LabelConfigError, match=fragment):
        parse_label_config(cfg)


def test_context_filters_by_type_and_name():
    spec = parse_label_config(LABEL_CONFIG)
    ctx = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["  red   car ", ""]}},
                      {"type": "brushlabels", "from_name": "prompt", "value": {"text": ["no"]}},
                      "junk", {"type": "textarea", "from_name": "prompt", "value": {"text": "blue car"}}]}
    assert context_sentences(spec, ctx) == ["red car", "blue car"]
    assert context_sentences(spec, None) == [] and context_sentences(spec, {"result": None}) == []


def test_label_matching():
    cfg = ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"><Label value="car"/>'
           '<Label value="red car"/><Label value="person" predicted_values="man, woman"/></BrushLabels></View>')
    spec = parse_label_config(cfg)
    assert label_for_sentence(spec, "the red car on the left") == "red car"
    assert label_for_sentence(spec, "a car") == "car"
    assert label_for_sentence(spec, "the man in the red shirt") == "person"
    assert label_for_sentence(spec, "carpet") == "car"          # no whole-word match: first label
    assert label_for_sentence(spec, "the woman") == "person"


def test_sources_in_order():
    spec = parse_label_config(LABEL_CONFIG)
    t = {"data": {"image": "x", "text": "from task"}}
    ctx = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["from context"]}}]}
    assert [(p.sentence, p.source) for p in collect_prompts(spec, t, ctx)] == [("from context", "context")]
    assert [(p.sentence, p.source) for p in collect_prompts(spec, t, None)] == [("from task", "task")]
    assert [(p.sentence, p.label, p.source) for p in collect_prompts(spec, {"data": {"image": "x"}})] == [
        ("object", "object", "label"), ("circle", "circle", "label")]
    assert [p.sentence for p in collect_prompts(spec, {"data": {"image": "x", "sentence": "s"}}, None,
                                                fields=("sentence",))] == ["s"]


def test_sentence_of_a_submitted_region():
    from tests.payloads import brush_result, textarea_result

    mask = np.zeros((4, 5), bool)
    brush, other = brush_result(mask, "r1"), brush_result(mask, "r2")
    task = {"id": 1, "data": {"image": "x", "text": "from   task"}}
    per_region = textarea_result("per region", "r1")           # the region's own TextArea (same id) wins
    assert region_sentence(brush, [brush, per_region, textarea_result("global", "g")], task) == (
        "per region", "region-textarea")
    child = textarea_result("child", "c1", parent_id="r1")      # linked by parentID
    assert region_sentence(brush, [brush, child], task)[0] == "child"
    # the annotation's TextArea, but not another region's
    assert region_sentence(brush, [brush, other, textarea_result("r2's", "r2"), textarea_result("glob", "g")],
                           task) == ("glob", "textarea")
    assert region_sentence(brush, [brush], task) == ("from task", "task.data.text")
    assert region_sentence(brush, [brush], {"data": {"image": "x"}}) == (None, None)
