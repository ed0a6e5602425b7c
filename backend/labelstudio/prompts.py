"""Where a sentence comes from: the labeling config (through LabelInterface), the interactive context, task data,
and the labels themselves.

Order of sentence sources for one task (the first that gives any sentence wins):
1. interactive context: ``params.context.result`` items with ``type == "textarea"`` whose ``from_name`` is the prompt
   TextArea (matched by name, never by position);
2. task data fields (``PROMPT_FIELDS``, default ``text,prompt,caption,expression``); a string or a list of strings;
3. class-level pre-labeling: every label of the BrushLabels control, as its ``predicted_values`` (comma-separated,
   one sentence each), else its ``hint``, else its value.

Several sentences give several regions. Labels: a sentence from 1 or 2 gets the label whose value (or one of its
predicted values) appears in the sentence as a word (the longest match), else the first label; a sentence from 3
gets its own label.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

logger = logging.getLogger(__name__)


class LabelConfigError(ValueError):
    """The labeling config cannot be used by this backend (message is safe to show to a client)."""


@dataclass(frozen=True)
class LabelingSpec:
    image_name: str                    # <Image name>  -> region to_name
    image_value_key: str               # $image        -> task.data key
    brush_name: str                    # <BrushLabels name> -> region from_name
    labels: tuple                      # label values in config order
    label_sentences: tuple             # ((label, (sentence, ...)), ...) for class-level pre-labeling
    label_aliases: tuple               # ((label, (alias, ...)), ...): value + predicted_values, for matching
    prompt_name: Optional[str] = None  # <TextArea name> bound to the image, if any


@dataclass(frozen=True)
class Prompt:
    sentence: str
    label: Optional[str]
    source: str                        # "context" | "task" | "label"


def _split_values(raw) -> list[str]:
    if not raw:
        return []
    return [v.strip() for v in str(raw).split(",") if v.strip()]


@functools.lru_cache(maxsize=64)
def _parse_cached(digest: str, label_config: str) -> LabelingSpec:
    from label_studio_sdk.label_interface import LabelInterface
    try:
        li = LabelInterface(label_config)
    except Exception as exc:
        raise LabelConfigError(f"cannot parse the labeling config: {type(exc).__name__}: {exc}") from None

    brush = None
    for ctrl in li.controls:
        if ctrl.tag == "BrushLabels":
            brush = ctrl
            break
    if brush is None:
        raise LabelConfigError("the labeling config has no <BrushLabels> control; this backend predicts brush masks")
    image = None
    for obj in brush.objects if hasattr(brush, "objects") else []:
        if obj.tag == "Image":
            image = obj
            break
    if image is None:
        raise LabelConfigError(f"<BrushLabels name=\"{brush.name}\"> is not attached (toName) to an <Image>")
    value = str(image.value or "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image name=\"{image.name}\"> must take its URL from task data (value=\"$image\")")

    prompt_name = None
    for ctrl in li.controls:
        if ctrl.tag == "TextArea" and image.name in (ctrl.to_name or []):
            prompt_name = ctrl.name
            break

    labels, sentences, aliases = [], [], []
    for label_value, tag in (brush.labels_attrs or {}).items():
        attrs = getattr(tag, "attr", None) or {}
        labels.append(label_value)
        predicted = _split_values(attrs.get("predicted_values"))
        hint = (attrs.get("hint") or "").strip()
        sentences.append((label_value, tuple(predicted) if predicted else ((hint,) if hint else (label_value,))))
        aliases.append((label_value, tuple([label_value] + predicted)))
    if not labels:
        raise LabelConfigError(f"<BrushLabels name=\"{brush.name}\"> has no <Label>")
    return LabelingSpec(image_name=image.name, image_value_key=value[1:], brush_name=brush.name,
                        labels=tuple(labels), label_sentences=tuple(sentences), label_aliases=tuple(aliases),
                        prompt_name=prompt_name)


def parse_label_config(label_config: str) -> LabelingSpec:
    """LabelingSpec for a config XML; cached by content."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError("label_config is missing or empty")
    digest = hashlib.sha1(label_config.encode("utf-8")).hexdigest()
    return _parse_cached(digest, label_config)


# ---------------------------------------------------------------------- sentence sources
def _clean(sentence) -> Optional[str]:
    if not isinstance(sentence, str):
        return None
    s = " ".join(sentence.split())
    return s or None


def context_sentences(spec: LabelingSpec, context) -> list[str]:
    """Sentences typed into the prompt TextArea, from an interactive ``params.context``."""
    if not isinstance(context, dict):
        return []
    items = context.get("result")
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        if not isinstance(item, dict) or item.get("type") != "textarea":
            continue
        if spec.prompt_name is not None and item.get("from_name") != spec.prompt_name:
            continue
        value = item.get("value") or {}
        texts = value.get("text") if isinstance(value, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        for t in texts or []:
            s = _clean(t)
            if s and s not in out:
                out.append(s)
    return out


def task_sentences(task: dict, fields: Sequence[str]) -> list[str]:
    data = task.get("data") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        return []
    for key in fields:
        raw = data.get(key)
        values = raw if isinstance(raw, list) else [raw]
        out = []
        for v in values:
            s = _clean(v)
            if s and s not in out:
                out.append(s)
        if out:
            return out
    return []


def label_for_sentence(spec: LabelingSpec, sentence: str) -> str:
    """The label whose value (or a predicted value) appears in the sentence as whole words; the longest match wins;
    the first label when none does."""
    low = sentence.lower()
    best, best_len = None, 0
    for label, aliases in spec.label_aliases:
        for alias in aliases:
            a = alias.lower().strip()
            if a and len(a) > best_len and re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", low):
                best, best_len = label, len(a)
    return best if best is not None else spec.labels[0]


def collect_prompts(spec: LabelingSpec, task: dict, context=None,
                    fields: Sequence[str] = ("text", "prompt", "caption", "expression")) -> list[Prompt]:
    sentences = context_sentences(spec, context)
    if sentences:
        return [Prompt(s, label_for_sentence(spec, s), "context") for s in sentences]
    sentences = task_sentences(task, fields)
    if sentences:
        return [Prompt(s, label_for_sentence(spec, s), "task") for s in sentences]
    out = []
    for label, label_sents in spec.label_sentences:
        for s in label_sents:
            s = _clean(s)
            if s:
                out.append(Prompt(s, label, "label"))
    return out


def is_interactive(context) -> bool:
    return isinstance(context, dict) and isinstance(context.get("result"), list)
