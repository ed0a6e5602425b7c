"""Clicks and boxes of an interactive call: Label Studio's smart ``KeyPointLabels`` / ``RectangleLabels`` regions
(and unlabeled ``KeyPoint`` / ``Rectangle``) in ``params.context.result``, as SAM prompts on the task's picture.

What LS 1.23.2's editor sends (``libs/editor/src``: ``regions/KeyPointRegion.jsx``, ``regions/RectRegion.jsx``,
``mixins/Regions.js``, ``tags/object/Image/Image.js``; the call itself in ``apps/labelstudio``'s
``DataManager.jsx``): when a smart region is finished, the context holds that region and every other smart region of
the same kind, label and image still in the annotation (the editor deletes them once the suggestion is accepted or
rejected), each as the region serializes::

    {"id": "Xk3_1", "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
     "original_width": 640, "original_height": 480, "image_rotation": 0, "is_positive": false,
     "value": {"x": 41.5, "y": 20.25, "width": 0.6, "keypointlabels": ["object"], "labels": ["object"]}}
    {"id": "R2", "from_name": "box", "to_name": "image", "type": "rectanglelabels", "original_width": 640, ...
     "value": {"x": 10, "y": 12.5, "width": 30, "height": 20, "rotation": 0, "rectanglelabels": ["object"]}}

``is_positive`` is false for a click made with Alt held (a smart keypoint only); ``x``, ``y``, ``width`` and
``height`` are percentages of the picture as the browser shows it, which is the EXIF-oriented picture at its natural
size, the very picture ``MediaFetcher`` returns (EXIF-transposed): ``x / 100 * W`` is the continuous coordinate
``SSPSAMPredictor.predict_interactive`` takes ((0, 0) the top-left corner, (W, H) the bottom-right one).
``image_rotation`` is the editor's view rotation; coordinates are those of the unrotated picture.

:func:`prompt_items` picks the items that belong to the mask control's image (without the picture: enough to decide
how to answer); :func:`sam_prompts` turns them into pixels and refuses bad values with a message fit for the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from backend.labelstudio.label_config import LabelingSpec
from backend.labelstudio.prompts import context_items
from ssp_sam.clicks import Click     # x, y: continuous coordinates on the EXIF-transposed picture

CLICK_TYPES = ("keypointlabels", "keypoint")
BOX_TYPES = ("rectanglelabels", "rectangle")
MAX_CLICKS = 200            # SAM was trained with a handful; a request with thousands is refused, not computed


class PromptError(ValueError):
    """A click or a box the backend cannot use (the message is safe to show to a client)."""


@dataclass(frozen=True)
class PromptItems:
    """The click and box items of a context that belong to the mask control's image, in context order."""
    clicks: tuple           # result items
    boxes: tuple
    notes: tuple            # why other items were left out (for the response's message)
    ordered: tuple = ()     # the clicks and boxes together, in context order

    def __bool__(self) -> bool:
        return bool(self.clicks or self.boxes)


@dataclass(frozen=True)
class SamPrompts:
    clicks: tuple           # (Click, ...) in context order
    boxes: tuple            # ((x0, y0, x1, y1), ...) in context order; SAM takes one, the last
    labels: tuple           # the items' labels that are labels of the mask control, last item first
    notes: tuple

    @property
    def box(self) -> Optional[tuple]:
        return self.boxes[-1] if self.boxes else None


def _name(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _describe(item: Mapping) -> str:
    kind = "box" if str(item.get("type", "")).lower() in BOX_TYPES else "click"
    rid = item.get("id")
    return f"{kind} {_name(rid)[:40]!s}" if rid is not None else kind


def prompt_items(spec: LabelingSpec, context: Any) -> PromptItems:
    """The click and box items of an interactive context that are prompts on the mask control's image: of a click or
    box control of the labeling config bound to that image (``spec.prompt_controls``) and naming that image
    (``to_name``; absent counts as that image). The others are left out, each with a note."""
    controls = {name: kind for name, kind, _ in spec.prompt_controls}
    clicks, boxes, notes, ordered = [], [], [], []
    for item in context_items(context):
        kind = str(item.get("type", "")).lower()
        if kind not in CLICK_TYPES + BOX_TYPES:
            continue
        want = "box" if kind in BOX_TYPES else "click"
        to_name, from_name = item.get("to_name"), item.get("from_name")
        if to_name is not None and to_name != spec.image_name:
            notes.append(f"{_describe(item)} is on image '{_name(to_name)[:60]}', not on '{spec.image_name}': "
                         "ignored")
        elif not isinstance(from_name, str) or controls.get(from_name) != want:
            notes.append(f"{_describe(item)} comes from '{_name(from_name)[:60]}', which is no "
                         f"{'RectangleLabels' if want == 'box' else 'KeyPointLabels'} control on image "
                         f"'{spec.image_name}' in the labeling config: ignored")
        else:
            (boxes if want == "box" else clicks).append(item)
            ordered.append(item)
    return PromptItems(tuple(clicks), tuple(boxes), tuple(notes), tuple(ordered))


def _number(item: Mapping, key: str, default: Optional[float] = None) -> float:
    value = (item.get("value") or {}).get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{_describe(item)}: value.{key} must be a number, got {_name(value)[:40]}")
    value = float(value)
    if not math.isfinite(value):
        raise PromptError(f"{_describe(item)}: value.{key} must be a finite number, got {value}")
    return value


def _check_size(item: Mapping, width: int, height: int) -> None:
    """The picture the region was drawn on (``original_width`` x ``original_height``, when given) must have the
    task picture's proportions: percentages of another picture (one shown without its EXIF rotation, say) would land
    elsewhere."""
    ow, oh = item.get("original_width"), item.get("original_height")
    if ow is None and oh is None:
        return
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
           for v in (ow, oh)):
        raise PromptError(f"{_describe(item)}: original_width and original_height must be positive numbers")
    if abs(ow * height - oh * width) > 0.01 * max(ow * height, oh * width):
        raise PromptError(f"{_describe(item)} was drawn on a {ow:g}x{oh:g} picture, but the task's picture is "
                          f"{width}x{height} (after its EXIF orientation)")


def _item_label(spec: LabelingSpec, item: Mapping) -> Optional[str]:
    value = item.get("value") or {}
    for key in (str(item.get("type", "")).lower(), "labels"):
        labels = value.get(key)
        if isinstance(labels, list):
            for label in labels:
                if isinstance(label, str):
                    return label
    return None


def sam_prompts(spec: LabelingSpec, items: PromptItems, width: int, height: int) -> SamPrompts:
    """The items as SAM prompts on a ``width`` x ``height`` picture (the task's, EXIF-transposed); ``PromptError``
    naming the item for a value that is no number, a click outside the picture, a box without area or outside the
    picture, a region drawn on a picture of other proportions, a non-boolean ``is_positive``."""
    if len(items.clicks) > MAX_CLICKS:
        raise PromptError(f"{len(items.clicks)} clicks: at most {MAX_CLICKS} are taken")
    notes = list(items.notes)
    clicks = []
    for item in items.clicks:
        if not isinstance(item.get("value"), Mapping):
            raise PromptError(f"{_describe(item)} has no 'value' object")
        _check_size(item, width, height)
        x, y = _number(item, "x"), _number(item, "y")
        if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
            raise PromptError(f"{_describe(item)} at x={x:g} %, y={y:g} % is outside the picture (0-100 %)")
        positive = item.get("is_positive", True)
        if not isinstance(positive, bool):
            raise PromptError(f"{_describe(item)}: is_positive must be true or false, got {_name(positive)[:40]}")
        clicks.append(Click(x / 100.0 * width, y / 100.0 * height, positive))
    boxes = []
    for item in items.boxes:
        if not isinstance(item.get("value"), Mapping):
            raise PromptError(f"{_describe(item)} has no 'value' object")
        _check_size(item, width, height)
        x, y, w, h = (_number(item, k) for k in ("x", "y", "width", "height"))
        rotation = _number(item, "rotation", 0.0)
        if w <= 0 or h <= 0:
            raise PromptError(f"{_describe(item)} has no area (width {w:g} %, height {h:g} %)")
        boxes.append(_box_pixels(item, x, y, w, h, rotation, width, height))
    if len(boxes) > 1:
        notes.append(f"{len(boxes)} boxes: the last one is the prompt")
    labels = []
    names = set(spec.labels)
    for item in reversed(items.ordered):
        label = _item_label(spec, item)
        if label is None:
            continue
        if label in names:
            if label not in labels:
                labels.append(label)
        else:
            notes.append(f"label '{label[:60]}' of {_describe(item)} is no label of <{spec.brush_name}>")
    return SamPrompts(tuple(clicks), tuple(boxes), tuple(labels), tuple(dict.fromkeys(notes)))


def _box_pixels(item: Mapping, x: float, y: float, w: float, h: float, rotation: float, width: int,
                height: int) -> tuple:
    """The axis-aligned box, in pixels and clipped to the picture, of a rectangle of ``w`` x ``h`` % at ``x``, ``y``
    % turned by ``rotation`` degrees (clockwise on screen) about its top-left corner, as LS draws it."""
    x0, y0, bw, bh = x / 100.0 * width, y / 100.0 * height, w / 100.0 * width, h / 100.0 * height
    xs, ys = [x0, x0 + bw], [y0, y0 + bh]
    if rotation % 360:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        corners = [(dx * c - dy * s, dx * s + dy * c) for dx in (0.0, bw) for dy in (0.0, bh)]
        xs = [x0 + cx for cx, _ in corners]
        ys = [y0 + cy for _, cy in corners]
    box = (max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys)))
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        raise PromptError(f"{_describe(item)} at x={x:g} %, y={y:g} % lies outside the picture")
    return box


def prompt_label(spec: LabelingSpec, prompts: SamPrompts, sentence_label: Optional[str]) -> str:
    """The label of the refined region: the label of the last click or box that names one of the mask control's
    labels, else the sentence's (``prompts.label_for_sentence``), else the first label."""
    if prompts.labels:
        return prompts.labels[0]
    return sentence_label or spec.labels[0]


__all__ = ["CLICK_TYPES", "BOX_TYPES", "MAX_CLICKS", "PromptError", "Click", "PromptItems", "SamPrompts",
           "prompt_items", "sam_prompts", "prompt_label"]
