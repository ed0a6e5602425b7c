"""Interactive sessions (backend/serving/sessions.py): what a call with clicks or boxes is lent by the calls before
it on the same picture, when the previous mask becomes SAM's dense prompt, and when a session starts afresh."""

from __future__ import annotations

import numpy as np

from backend.labelstudio.sam_prompts import Click
from backend.serving.sessions import InteractiveSessions, Session

KEY = ("v1", 1, 7, "picture-sha")
C1, C2, C3 = Click(10, 10, True), Click(20, 20, False), Click(30, 30, True)
BOX = (1.0, 2.0, 30.0, 40.0)


def logits(v: float) -> np.ndarray:
    return np.full((1, 256, 256), v, np.float32)


def test_a_typed_sentence_then_clicks_that_extend_each_other():
    s = InteractiveSessions(mask_prompt=True)
    s.sentence_typed(KEY, "the red circle")
    first = s.plan(KEY, None, (C1,), ())
    # the click call carries no sentence (LS sends only the clicks): the session lends it; the first click refines
    # the sentence's own mask, which the caller computes
    assert (first.sentence, first.clicks, first.continued, first.refines) == ("the red circle", (C1,), True, True)
    assert first.mask_input is None and first.sentence_mask_needed
    sentence_mask = logits(0)
    s.answered(KEY, first, first.sentence, logits(1), sentence_mask)
    second = s.plan(KEY, None, (C1, C2), ())
    assert second.sentence == "the red circle" and second.refines and not second.sentence_mask_needed
    assert second.mask_input[0, 0, 0] == 1                # the previous answer's logits
    s.answered(KEY, second, second.sentence, logits(2), second.mask_input)
    # the same clicks again (LS re-sends when a region is finished twice): the same dense prompt, so the same answer
    again = s.plan(KEY, None, (C1, C2), ())
    assert again.continued and not again.refines and again.mask_input[0, 0, 0] == 1


def test_a_box_call_keeps_the_clicks_and_a_click_call_keeps_the_box():
    s = InteractiveSessions(mask_prompt=True)
    s.sentence_typed(KEY, "s")
    p = s.plan(KEY, None, (C1,), ())
    s.answered(KEY, p, p.sentence, logits(1), None)
    p = s.plan(KEY, None, (), (BOX,))                     # a box call: only boxes in the context
    assert (p.clicks, p.box, p.sentence, p.refines) == ((C1,), BOX, "s", True) and p.mask_input[0, 0, 0] == 1
    s.answered(KEY, p, p.sentence, logits(2), p.mask_input)
    p = s.plan(KEY, None, (C1, C2), ())
    assert (p.clicks, p.box, p.refines) == ((C1, C2), BOX, True) and p.mask_input[0, 0, 0] == 2


def test_a_new_session_starts_with_only_what_the_call_carries():
    s = InteractiveSessions(mask_prompt=True)
    s.sentence_typed(KEY, "s")
    p = s.plan(KEY, None, (C1, C2), ())
    s.answered(KEY, p, p.sentence, logits(1), None)
    # the suggestion was accepted, LS deleted its smart regions: the next click list starts elsewhere
    fresh = s.plan(KEY, None, (C3,), ())
    assert (fresh.sentence, fresh.clicks, fresh.continued, fresh.refines, fresh.mask_input) == (
        None, (C3,), False, False, None)
    # another sentence in the call: a new session too
    s.answered(KEY, p, "s", logits(1), None)
    other = s.plan(KEY, "the blue square", (C1, C2, C3), ())
    assert (other.sentence, other.continued, other.mask_input) == ("the blue square", False, None)
    # another task, picture or model version: nothing to continue
    for key in (("v2", 1, 7, "picture-sha"), ("v1", 1, 8, "picture-sha"), ("v1", 1, 7, "other")):
        assert not s.plan(key, None, (C1, C2, C3), ()).continued
    # a new box that does not start the box list as before
    s.answered(KEY, s.plan(KEY, None, (), (BOX,)), "s", logits(3), None)
    assert not s.plan(KEY, None, (), ((0.0, 0.0, 5.0, 5.0),)).continued


def test_without_the_setting_no_mask_is_kept_or_lent_but_the_sentence_is():
    s = InteractiveSessions(mask_prompt=False)
    s.sentence_typed(KEY, "s")
    p = s.plan(KEY, None, (C1,), ())
    assert p.sentence == "s" and p.mask_input is None and not p.sentence_mask_needed
    s.answered(KEY, p, p.sentence, logits(1), None)
    p = s.plan(KEY, None, (C1, C2), ())
    assert p.refines and p.mask_input is None and p.sentence == "s"
    assert s.stats()["bytes"] < 4096                      # no logits kept


def test_sessions_are_bounded_in_bytes():
    one = Session("s", (C1,), (), logits(1), logits(0)).nbytes
    assert one > 2 * logits(1).nbytes
    s = InteractiveSessions(max_bytes=3 * one, mask_prompt=True)
    for task in range(10):
        key = ("v1", 1, task, "p")
        s.sentence_typed(key, "s")
        p = s.plan(key, None, (C1,), ())
        s.answered(key, p, "s", logits(1), logits(0))
    assert len(s) == 3 and s.stats()["bytes"] <= 3 * one and s.stats()["evictions"] >= 7
    assert not s.plan(("v1", 1, 0, "p"), None, (C1, C2), ()).continued      # the oldest is gone
    assert s.plan(("v1", 1, 9, "p"), None, (C1, C2), ()).continued


def test_made_without_torch_until_used():
    """The gunicorn master and an idle worker never load torch (tests/serving/test_gunicorn.py): the LRU, which lives
    in ssp_sam.predictor, is made on first use."""
    import subprocess
    import sys

    code = ("import sys; from backend.serving.sessions import InteractiveSessions; s = InteractiveSessions(); "
            "assert s.stats()['items'] == 0 and len(s) == 0; assert 'torch' not in sys.modules; "
            "s.sentence_typed(('v', 1, 2, 'p'), 'x'); assert 'torch' in sys.modules and len(s) == 1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
