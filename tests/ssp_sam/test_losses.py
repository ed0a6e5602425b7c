"""Losses against hand-computed values and against the formulas of the official code (which the torchvision.ops
implementations replace)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from ssp_sam.losses import box_losses, dice_loss, focal_loss, ssp_sam_loss


# The previous hand-written implementations, kept as references for torchvision.ops.


def old_sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0):
    g = target.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    p_t = p * g + (1 - p) * (1 - g)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * g + (1 - alpha) * (1 - g)) * loss
    return loss.mean()


def old_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def old_xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def old_generalized_box_iou(a, b, eps=1e-7):
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    area_c = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / (union + eps) - (area_c - union) / (area_c + eps)


def old_box_losses(pred, target, valid):
    n = valid.sum().clamp(min=1).to(pred.dtype)
    w = valid.to(pred.dtype)
    l1 = ((pred - target).abs().sum(-1) * w).sum() / n
    giou = 1 - old_generalized_box_iou(old_cxcywh_to_xyxy(pred), old_cxcywh_to_xyxy(target))
    return l1, (giou * w).sum() / n


def test_torchvision_losses_equal_the_previous_formulas_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(6, 1, 16, 16, generator=g) * 4
        target = (torch.rand(6, 1, 16, 16, generator=g) > 0.7).float()
        assert torch.allclose(focal_loss(logits, target), old_sigmoid_focal_loss(logits, target), rtol=1e-6, atol=0)
        pred = torch.rand(32, 4, generator=g)                        # sigmoid outputs, like the box head's
        tgt = torch.cat([torch.rand(32, 2, generator=g), torch.rand(32, 2, generator=g) * 0.5], -1)
        tgt[:5] = 0                                                  # no-target rows (degenerate zero boxes)
        valid = torch.rand(32, generator=g) > 0.2
        valid[:5] = False
        for new, old in zip(box_losses(pred, tgt, valid), old_box_losses(pred, tgt, valid)):
            assert torch.allclose(new, old, rtol=1e-6, atol=1e-7), (new, old)
        xyxy = box_convert(pred, "cxcywh", "xyxy")
        assert torch.allclose(xyxy, old_cxcywh_to_xyxy(pred), atol=1e-7)
        assert torch.allclose(box_convert(xyxy, "xyxy", "cxcywh"), old_xyxy_to_cxcywh(xyxy), atol=1e-7)
    # gradients agree too
    a = pred.clone().requires_grad_(True)
    b = pred.clone().requires_grad_(True)
    sum(box_losses(a, tgt, valid)).backward()
    sum(old_box_losses(b, tgt, valid)).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


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
    assert focal_loss(logits, gt).item() == pytest.approx(expected, rel=1e-6)


def test_giou_hand_computed():
    # boxes (0,0)-(2,2) and (1,1)-(3,3) in cxcywh: I = 1, U = 7, C = 9 -> GIoU 1/7 - 2/9; loss 1 - GIoU
    a = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    _, giou = box_losses(a, b)
    assert giou.item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-5)
    assert box_losses(a, a)[1].item() == pytest.approx(0.0, abs=1e-6)


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
