"""Interactive sessions: what one annotator's calls on one picture have said so far, per worker process.

Label Studio sends no session id, and each interactive call carries only the regions of one kind (the submitted
sentence, or every smart click of one label, or every smart box of one label: ``mixins/Regions.js``
``getConnectedDynamicRegions`` in LS 1.23.2's editor). A session is therefore defined from what the calls carry:

* its key: the served model version, the project, the task and the picture (its content key);
* a typed sentence starts a new session with that sentence and no clicks or boxes;
* a call with clicks or boxes continues the session when its sentence (if it has one) is the session's and each
  of its lists starts as the session's (the editor keeps the smart regions of an unfinished correction and sends them
  all each time; once a suggestion is accepted or rejected it deletes them, so the next click starts a new list). A
  continued session lends the call what the call lacks: the sentence, the clicks of a box call, the box of a click
  call. Otherwise the call starts a new session with only what it carries;
* the previous answer's low-resolution logits are SAM's dense prompt (``mask_input``) when the call *refines* the
  session (its lists extend the session's by at least one region) and ``INTERACTIVE_MASK_PROMPT`` is on. The first
  click after a typed sentence refines the sentence's own mask, as ``ssp-sam eval --clicks`` measures it. A call that
  repeats the session's prompts exactly gets the dense prompt the session's answer was computed with (the same answer).

Sessions live in a ``ssp_sam.predictor.ByteLRU`` bounded in bytes (the logits are 1 x 256 x 256 float32, 256 KB,
for SAM's 1024-pixel input); the least recently used are dropped. It is made on first use: ``ssp_sam.predictor``
imports torch, which neither the gunicorn master nor a worker that has not predicted yet loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import threading

import numpy as np

SESSIONS_BYTES = 32 * 2**20            # about 120 sessions with logits
_ENTRY_BYTES = 512                     # what an entry costs besides its arrays, roughly


@dataclass(frozen=True)
class Session:
    sentence: Optional[str]
    clicks: tuple = ()                  # (sam_prompts.Click, ...)
    boxes: tuple = ()                   # ((x0, y0, x1, y1), ...)
    logits: Optional[np.ndarray] = None     # low_res_logits of the session's last answer
    used: Optional[np.ndarray] = None       # the mask_input that answer was computed with

    @property
    def nbytes(self) -> int:
        arrays = {id(a): a.nbytes for a in (self.logits, self.used) if a is not None}
        return (_ENTRY_BYTES + len(self.sentence or "") + 24 * (len(self.clicks) + len(self.boxes))
                + sum(arrays.values()))


@dataclass(frozen=True)
class Plan:
    """What one call with clicks or boxes predicts with."""
    sentence: Optional[str]             # the call's, else the continued session's (None: the caller may add one)
    clicks: tuple
    boxes: tuple
    continued: bool                     # the call continues its session
    refines: bool                       # ... and adds at least one click or box to it
    mask_input: Optional[np.ndarray]    # SAM's dense prompt (only with INTERACTIVE_MASK_PROMPT on)
    sentence_mask_needed: bool          # the dense prompt is the sentence's own mask, which the caller computes
    known: bool = True                  # this process has a session for the key (continued or not)

    @property
    def box(self) -> Optional[tuple]:
        return self.boxes[-1] if self.boxes else None


def _starts_as(new: tuple, old: tuple) -> bool:
    return not new or not old or new[0] == old[0]


def _extends(new: tuple, old: tuple) -> bool:
    return new[:len(old)] == old


class InteractiveSessions:
    def __init__(self, max_bytes: int = SESSIONS_BYTES, mask_prompt: bool = False) -> None:
        self.mask_prompt = bool(mask_prompt)
        self.max_bytes = int(max_bytes)
        self._made = None
        self._lock = threading.Lock()

    @property
    def _lru(self):
        if self._made is None:
            with self._lock:
                if self._made is None:
                    from ssp_sam.predictor import ByteLRU
                    self._made = ByteLRU(self.max_bytes)
        return self._made

    def sentence_typed(self, key, sentence: str) -> None:
        """A call with only a typed sentence: a new session."""
        self._lru.put(key, Session(sentence))

    def plan(self, key, sentence: Optional[str], clicks: tuple, boxes: tuple) -> Plan:
        """The prompts of a call with ``clicks`` and/or ``boxes`` (and the context's ``sentence``, if any), completed
        from the session it continues."""
        prev = self._lru.get(key)
        continued = (prev is not None and (sentence is None or sentence == prev.sentence)
                     and _starts_as(clicks, prev.clicks) and _starts_as(boxes, prev.boxes))
        if not continued:
            return Plan(sentence, clicks, boxes, False, False, None, False, known=prev is not None)
        clicks, boxes = clicks or prev.clicks, boxes or prev.boxes
        grown = _extends(clicks, prev.clicks) and _extends(boxes, prev.boxes)
        refines = grown and (len(clicks), len(boxes)) != (len(prev.clicks), len(prev.boxes))
        same = clicks == prev.clicks and boxes == prev.boxes
        mask_input, needed = None, False
        if self.mask_prompt:
            if refines:
                mask_input = prev.logits
                needed = prev.logits is None and prev.sentence is not None and not (prev.clicks or prev.boxes)
            elif same:
                mask_input = prev.used
        return Plan(sentence or prev.sentence, clicks, boxes, True, refines, mask_input, needed)

    def answered(self, key, plan: Plan, sentence: Optional[str], logits: Optional[np.ndarray],
                 used: Optional[np.ndarray]) -> None:
        """Remember a call's prompts (``sentence``: the one it predicted with) and, with the mask prompt on, its
        logits and the dense prompt it used."""
        keep = self.mask_prompt and logits is not None
        self._lru.put(key, Session(sentence, plan.clicks, plan.boxes, np.asarray(logits) if keep else None,
                                   used if keep else None))

    def stats(self) -> dict:
        if self._made is None:
            return {"items": 0, "bytes": 0, "max_bytes": self.max_bytes, "hits": 0, "misses": 0, "evictions": 0}
        return self._made.stats()

    def __len__(self) -> int:
        return 0 if self._made is None else len(self._made)


__all__ = ["SESSIONS_BYTES", "Session", "Plan", "InteractiveSessions"]
