"""Losses against hand-computed values (ssp-sam-model.md §9.1)."""

import math

import pytest
import torch

from ssp_sam.losses import (box_cxcywh_to_xyxy, box_losses, box_xyxy_to_cxcywh, dice_loss, generalized_box_iou,
                            sigmoid_focal_loss, ssp_sam_loss)


def test_dice_hand_computed():
    # logits 0 -> p = 0.5 everywhere; 2x2 mask with one positive pixel.
    logits = torch.zeros(1, 1, 2, 2)
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # 1 - (2*0.5 + 1) / (2.0 + 1 + 1) = 1 - 2/4 = 0.5
    assert dice_loss(logits, gt).item() == pytest.approx(0.5)
    # batch of two identical samples: summed then divided by B -> same value
    assert dice_loss(logits.repeat(2, 1, 1, 1), gt.repeat(2, 1, 1, 1)).item() == pytest.approx(0.5)
    # empty GT: 1 - 1 / (sum p + 1) = 1 - 1/3
    assert dice_loss(logits, torch.zeros_like(gt)).item() == pytest.approx(1 - 1 / 3)


def test_focal_hand_computed():
    logits = torch.zeros(1, 1, 1, 2)
    gt = torch.tensor([[[[1.0, 0.0]]]])
    # p = 0.5, ce = ln 2, (1 - p_t)^2 = 0.25; alpha weights 0.25 (pos) and 0.75 (neg); mean over 2 pixels
    expected = (0.25 * math.log(2) * 0.25 + 0.75 * math.log(2) * 0.25) / 2
    assert sigmoid_focal_loss(logits, gt).item() == pytest.approx(expected, rel=1e-6)


def test_giou_and_box_conversion():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # I = 1, U = 7, C = 9 -> 1/7 - 2/9
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, rel=1e-5)
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0, rel=1e-6)
    c = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(c)), c)


def test_box_losses_mask_no_target():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
    tgt = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.0, 0.0, 0.0, 0.0]])
    l1, giou = box_losses(pred, tgt, torch.tensor([True, False]))
    assert l1.item() == pytest.approx(0.2)          # only the first box: |0.2 - 0.4|
    assert giou.item() == pytest.approx(1 - 0.5, rel=1e-5)  # inside box of half the area: IoU 0.5, C = U
    l1_all, _ = box_losses(pred, tgt)
    assert l1_all.item() == pytest.approx((0.2 + 0.8) / 2)
    # no valid box at all: zero, still differentiable
    p = pred.clone().requires_grad_(True)
    l1_none, giou_none = box_losses(p, tgt, torch.tensor([False, False]))
    (l1_none + giou_none).backward()
    assert l1_none.item() == 0 and giou_none.item() == 0 and p.grad is not None


def test_total_weights_and_box_only():
    logits = torch.zeros(1, 1, 2, 2)
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    out = ssp_sam_loss(logits, gt, box, box)
    p = out.parts
    assert p["l1"] == pytest.approx(0) and p["giou"] == pytest.approx(0, abs=1e-5)
    assert out.total.item() == pytest.approx(4 * p["dice"] + 4 * p["focal"], rel=1e-5)
    only = ssp_sam_loss(None, None, box, box + 0.1, box_only=True)
    assert "dice" not in only.parts
    assert only.total.item() == pytest.approx(5 * 0.4 + 2 * only.parts["giou"], rel=1e-5)
    with pytest.raises(ValueError):
        ssp_sam_loss(logits, gt[..., :1], box, box)


def test_grounding_loss_rewards_a_map_on_the_referent():
    import torch
    from ssp_sam.losses import grounding_loss
    grid = torch.zeros(2, 16)
    grid[:, 5] = 1.0                                   # the referent covers patch 5
    valid = torch.tensor([True, False])                 # the second sample has no target: ignored
    good = torch.zeros(2, 16, 1)
    good[:, 5] = 1.0
    bad = torch.zeros(2, 16, 1)
    bad[:, 9] = 1.0
    assert grounding_loss(good, grid, valid) < 0.01 < grounding_loss(bad, grid, valid)
    assert grounding_loss(bad, grid, torch.tensor([False, False])) == 0


def test_referent_patch_loss_rewards_logits_on_the_referent_and_empty_maps_without_one():
    import torch
    from ssp_sam.losses import referent_patch_loss
    grid = torch.zeros(2, 16)
    grid[0, 5] = 0.9                                   # sample 0: the referent covers patch 5; sample 1: no target
    good = torch.full((2, 16), -8.0)
    good[0, 5] = 8.0
    shifted = good.clone()
    shifted[0, 5], shifted[0, 9] = -8.0, 8.0
    fires_on_none = good.clone()
    fires_on_none[1, 3] = 8.0
    assert referent_patch_loss(good, grid) < 0.01
    assert referent_patch_loss(shifted, grid) > 0.5 and referent_patch_loss(fires_on_none, grid) > 0.25
    assert referent_patch_loss(good, grid * 0.2) > 0.25  # coverage under the threshold is a negative patch
