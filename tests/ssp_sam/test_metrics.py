"""Metrics against hand-computed numbers, with the official GRES conventions (no-target rule, N-acc, T-acc)."""

import math

import numpy as np
import pytest

from ssp_sam.metrics import MetricAccumulator, empty_threshold, format_table, mask_iou


def _mask(shape, *boxes):
    m = np.zeros(shape, np.uint8)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def test_threshold_scaling():
    assert empty_threshold(512) == 50
    assert empty_threshold(256) == pytest.approx(12.5)
    assert empty_threshold(64) == pytest.approx(50 / 64)


def test_gres_table():
    gt_empty = np.zeros((512, 512), np.uint8)
    assert mask_iou(_mask((512, 512), (0, 7, 0, 7)), gt_empty) == (1.0, 0, 0)      # 49 px < 50
    assert mask_iou(_mask((512, 512), (0, 5, 0, 10)), gt_empty) == (0.0, 0, 50)    # 50 px
    gt = _mask((10, 10), (0, 2, 0, 2))                                              # 4 px
    pred = _mask((10, 10), (0, 2, 0, 4))                                            # 8 px, 4 overlap
    assert mask_iou(pred, gt) == (0.5, 4, 8)
    assert mask_iou(np.zeros((10, 10)), gt) == (0.0, 0, 4)
    with pytest.raises(ValueError):
        mask_iou(np.zeros((3, 3)), np.zeros((3, 4)))


def test_accumulator_hand_computed():
    acc = MetricAccumulator()
    gt = _mask((10, 10), (0, 2, 0, 2))
    acc.add(gt, gt, group="attr")                               # IoU 1, I 4 U 4
    acc.add(_mask((10, 10), (0, 2, 0, 4)), gt, group="attr")    # IoU 0.5, I 4 U 8
    acc.add(_mask((10, 10), (0, 4, 0, 4)), gt, group="multi")   # IoU 0.25, I 4 U 16
    acc.add(np.zeros((10, 10)), np.zeros((10, 10)), threshold=1, group="none")   # IoU 1 (empty, empty)
    acc.add(_mask((10, 10), (0, 1, 0, 2)), np.zeros((10, 10)), threshold=1, group="none")  # IoU 0, U 2
    m = acc.compute(by_group=True)
    assert m["mIoU"] == pytest.approx((1 + 0.5 + 0.25 + 1 + 0) / 5)
    assert m["gIoU"] == m["mIoU"]
    assert m["oIoU"] == pytest.approx(12 / (4 + 8 + 16 + 0 + 2))
    assert m["Pr@0.50"] == pytest.approx(3 / 5)   # 1, 0.5 (>=), 1
    assert m["Pr@0.55"] == pytest.approx(2 / 5)
    assert m["N-acc"] == pytest.approx(1 / 2)
    assert m["T-acc"] == pytest.approx(2 / 3)     # 0.5 and 0.25 (the perfect one is not counted, as official)
    assert m["attr/mIoU"] == pytest.approx(0.75) and m["none/n"] == 2
    assert m["n"] == 5 and m["n_empty"] == 2
    other = MetricAccumulator.from_state(acc.state())
    assert other.merge(acc).compute()["mIoU"] == pytest.approx(m["mIoU"])
    assert "mIoU" in format_table(m)


def test_undefined_ratios_are_nan():
    acc = MetricAccumulator()
    gt = _mask((4, 4), (0, 2, 0, 2))
    acc.add(gt, gt)
    m = acc.compute()
    assert math.isnan(m["N-acc"]) and m["T-acc"] == 0.0 and m["mIoU"] == 1.0
