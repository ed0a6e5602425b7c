"""Where a sentence comes from, for a prediction and for a submitted annotation.

For ``/predict``, the first source that gives any sentence wins:
1. the interactive context: ``params.context.result`` items with ``type == "textarea"`` whose ``from_name`` is the
   prompt TextArea (matched by name, never by position);
2. task data fields (``PROMPT_FIELDS``, default ``text,prompt,caption,expression``); a string or a list of strings;
3. class-level pre-labeling: every label of the BrushLabels control, as its ``predicted_values`` (comma-separated,
   one sentence each), else its ``hint``, else its value.

Several sentences give several regions. Labels: a sentence from 1 or 2 gets the label whose value (or one of its
predicted values) appears in the sentence as a word (the longest match), else the first label; a sentence from 3
gets its own label.

For a submitted brush region (the correction worker): the TextArea of that region (same id or ``parentID``), else
the annotation's TextArea that belongs to no other region, else a prompt field of the task data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from backend.labelstudio.label_config import LabelingSpec

DEFAULT_PROMPT_FIELDS = ("text", "prompt", "caption", "expression")


@dataclass(frozen=True)
class Prompt:
    sentence: str
    label: Optional[str]
    source: str                        # "context" | "task" | "label"


def clean_sentence(sentence: Any) -> Optional[str]:
    """Whitespace collapsed; None for anything that is not a non-blank string."""
    if not isinstance(sentence, str):
        return None
    return " ".join(sentence.split()) or None


def result_texts(item: Any) -> list[str]:
    """The cleaned, distinct texts of a ``textarea`` result item (``value.text`` is a string or a list)."""
    if not isinstance(item, Mapping) or str(item.get("type", "")).lower() != "textarea":
        return []
    value = item.get("value")
    texts = value.get("text") if isinstance(value, Mapping) else None
    out: list[str] = []
    for t in [texts] if isinstance(texts, str) else (texts if isinstance(texts, list) else []):
        s = clean_sentence(t)
        if s and s not in out:
            out.append(s)
    return out


# ---------------------------------------------------------------------- predictions
def context_items(context: Any) -> list:
    """The result items (JSON objects) of an interactive ``params.context``; [] for anything else."""
    items = context.get("result") if isinstance(context, Mapping) else None
    return [x for x in items if isinstance(x, Mapping)] if isinstance(items, list) else []


def context_sentences(spec: LabelingSpec, context: Any) -> list[str]:
    """Sentences typed into the prompt TextArea, from an interactive ``params.context``."""
    out: list[str] = []
    for item in context_items(context):
        if spec.prompt_name is not None and item.get("from_name") != spec.prompt_name:
            continue
        out += [s for s in result_texts(item) if s not in out]
    return out


def task_sentences(task: Any, fields: Sequence[str] = DEFAULT_PROMPT_FIELDS) -> list[str]:
    """The sentences of the first prompt field of the task data that has any."""
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        return []
    for key in fields:
        raw = data.get(key)
        out: list[str] = []
        for v in raw if isinstance(raw, list) else [raw]:
            s = clean_sentence(v)
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


def collect_prompts(spec: LabelingSpec, task: Any, context: Any = None,
                    fields: Sequence[str] = DEFAULT_PROMPT_FIELDS) -> list[Prompt]:
    sentences = context_sentences(spec, context)
    if sentences:
        return [Prompt(s, label_for_sentence(spec, s), "context") for s in sentences]
    sentences = task_sentences(task, fields)
    if sentences:
        return [Prompt(s, label_for_sentence(spec, s), "task") for s in sentences]
    return [Prompt(s, label, "label") for label, label_sents in spec.label_sentences
            for s in map(clean_sentence, label_sents) if s]


def is_interactive(context: Any) -> bool:
    return isinstance(context, Mapping) and isinstance(context.get("result"), list)


# ---------------------------------------------------------------------- submitted annotations
def region_sentence(region: Mapping, results: Sequence[Mapping], task: Mapping,
                    fields: Sequence[str] = DEFAULT_PROMPT_FIELDS) -> tuple[Optional[str], Optional[str]]:
    """The sentence of a submitted brush region and where it came from: ``(sentence, "region-textarea" |
    "textarea" | "task.data.<field>")``, or ``(None, None)``."""
    rid = region.get("id")
    textareas = [r for r in results if result_texts(r)]
    owned = {r.get("id") for r in results if str(r.get("type", "")).lower() != "textarea"}
    for r in textareas:
        if rid is not None and (r.get("id") == rid or r.get("parentID") == rid):
            return " ".join(result_texts(r)), "region-textarea"
    for r in textareas:
        if r.get("id") not in owned and r.get("parentID") not in owned:   # not another region's own TextArea
            return " ".join(result_texts(r)), "textarea"
    data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
    for f in fields:
        s = clean_sentence(data.get(f))
        if s:
            return s, f"task.data.{f}"
    return None, None


__all__ = ["DEFAULT_PROMPT_FIELDS", "Prompt", "clean_sentence", "result_texts", "context_items",
           "context_sentences", "task_sentences", "label_for_sentence", "collect_prompts", "is_interactive",
           "region_sentence"]
