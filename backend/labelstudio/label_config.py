"""The labeling config, read once through label-studio-sdk's ``LabelInterface``: which ``<Image>`` the masks belong
to, where its URL comes from in the task data, the mask control (``<BrushLabels>``, else ``<BitmaskLabels>``) and its
labels, the TextArea that holds the sentence, and the click and box controls (``<KeyPointLabels>``, ``<KeyPoint>``,
``<RectangleLabels>``, ``<Rectangle>``) on the same image, whose smart regions are SAM prompts.

Both sides use it: the server to answer ``/predict``, the correction worker to find a submitted region's image.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Optional


MASK_CONTROLS = {"BrushLabels": "brushlabels", "BitmaskLabels": "bitmasklabels"}   # tag -> result type
PROMPT_CONTROLS = {"KeyPointLabels": "click", "KeyPoint": "click", "RectangleLabels": "box", "Rectangle": "box"}


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend (the message is safe to show to a client)."""


@dataclass(frozen=True)
class LabelingSpec:
    image_name: str                    # <Image name>  -> region to_name
    image_value_key: str               # $image        -> task.data key
    brush_name: str                    # the mask control's name (<BrushLabels> or <BitmaskLabels>) -> from_name
    labels: tuple                      # label values in config order
    label_sentences: tuple             # ((label, (sentence, ...)), ...) for class-level pre-labeling
    label_aliases: tuple               # ((label, (alias, ...)), ...): value + predicted_values, for matching
    prompt_name: Optional[str] = None  # <TextArea name> bound to the image, if any
    images: tuple = ()                 # ((name, task data key), ...) of every <Image value="$key">
    mask_type: str = "brushlabels"     # the result type of the mask control: "brushlabels" | "bitmasklabels"
    prompt_controls: tuple = ()        # ((name, "click" | "box", (label, ...)), ...): click and box controls on the
                                       # mask control's image, in config order

    def image_data_key(self, to_name: Optional[str]) -> str:
        """The task data key of the image a region points to (``to_name``), else of the brush control's image."""
        return dict(self.images).get(to_name, self.image_value_key)


def _split_values(raw) -> list[str]:
    if not raw:
        return []
    return [v.strip() for v in str(raw).split(",") if v.strip()]


def _first(items, tag: str):
    return next((x for x in items if x.tag == tag), None)


def _labels(brush) -> tuple[tuple, tuple, tuple]:
    """(labels, sentences per label, aliases per label) of the mask control. A label's sentences are its
    ``predicted_values`` (comma-separated), else its ``hint``, else its value."""
    labels, sentences, aliases = [], [], []
    for value, tag in (brush.labels_attrs or {}).items():
        attrs = getattr(tag, "attr", None) or {}
        predicted = _split_values(attrs.get("predicted_values"))
        hint = (attrs.get("hint") or "").strip()
        labels.append(value)
        sentences.append((value, tuple(predicted) if predicted else ((hint,) if hint else (value,))))
        aliases.append((value, tuple([value] + predicted)))
    return tuple(labels), tuple(sentences), tuple(aliases)


@functools.lru_cache(maxsize=64)
def _parse_cached(digest: str, label_config: str) -> LabelingSpec:
    from label_studio_sdk.label_interface import LabelInterface

    try:
        li = LabelInterface(label_config)
    except Exception as exc:
        raise LabelConfigError(f"cannot parse the labeling config: {type(exc).__name__}: {exc}") from None
    brush = _first(li.controls, "BrushLabels") or _first(li.controls, "BitmaskLabels")
    if brush is None:
        raise LabelConfigError("the labeling config has no <BrushLabels> (or <BitmaskLabels>) control; this backend "
                               "predicts masks")
    image = _first(getattr(brush, "objects", None) or [], "Image")
    if image is None:
        raise LabelConfigError(f"<{brush.tag} name=\"{brush.name}\"> is not attached (toName) to an <Image>")
    value = str(image.value or "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image name=\"{image.name}\"> must take its URL from task data (value=\"$image\")")
    prompt = next((c for c in li.controls if c.tag == "TextArea" and image.name in (c.to_name or [])), None)
    labels, sentences, aliases = _labels(brush)
    if not labels:
        raise LabelConfigError(f"<{brush.tag} name=\"{brush.name}\"> has no <Label>")
    images = tuple((o.name, str(o.value)[1:]) for o in li.objects
                   if o.tag == "Image" and str(o.value or "").startswith("$"))
    prompt_controls = tuple((c.name, PROMPT_CONTROLS[c.tag], tuple(c.labels_attrs or ()))
                            for c in li.controls if c.tag in PROMPT_CONTROLS and image.name in (c.to_name or []))
    return LabelingSpec(image_name=image.name, image_value_key=value[1:], brush_name=brush.name, labels=labels,
                        label_sentences=sentences, label_aliases=aliases,
                        prompt_name=prompt.name if prompt is not None else None, images=images,
                        mask_type=MASK_CONTROLS[brush.tag], prompt_controls=prompt_controls)


def parse_label_config(label_config: str) -> LabelingSpec:
    """LabelingSpec for a config XML; cached by content."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError("label_config is missing or empty")
    try:
        digest = hashlib.sha1(label_config.encode("utf-8")).hexdigest()
    except UnicodeEncodeError as exc:
        raise LabelConfigError(f"the labeling config is not valid Unicode (position {exc.start})") from None
    return _parse_cached(digest, label_config)


__all__ = ["LabelConfigError", "LabelingSpec", "MASK_CONTROLS", "PROMPT_CONTROLS", "parse_label_config"]
