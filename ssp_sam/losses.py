"""SSP-SAM training losses, as in the official code (ssp-sam-model.md §9.1).

Mask: 4 x dice + 4 x sigmoid focal on the (B, 1, F, F) logits against the GT in the same padded SAM frame.
Box (auxiliary REC loss on the REG-token box, (cx, cy, w, h) normalised to the padded CLIP square): 5 x L1 + 2 x GIoU.

No-target samples (GRES). The official code trains them with an all-zero mask (the dice term then pushes every
probability to 0: with g = 0 it is 1 - 1 / (sum p + 1)) and with a degenerate all-zero box target, so the box head
learns to point at the top-left corner for "nothing". That target carries no information and its gradient competes
with the real boxes, so **by default we leave no-target samples out of the box losses** (``box_valid`` mask; L1 and
GIoU are averaged over the valid boxes only). ``official_no_target_box=True`` reproduces the official behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_WEIGHT = 4.0
FOCAL_WEIGHT = 4.0
L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(pg) + 1) / (sum p + sum g + 1) per sample on sigmoid probabilities, summed over the batch and
    divided by the batch size."""
    b = logits.shape[0]
    p = logits.sigmoid().flatten(1)
    g = target.flatten(1).to(p.dtype)
    num = 2 * (p * g).sum(1) + 1
    den = p.sum(1) + g.sum(1) + 1
    return (1 - num / den).sum() / max(b, 1)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (alpha 0.25, gamma 2): BCE-with-logits x focal weight, mean over all pixels."""
    g = target.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    p_t = p * g + (1 - p) * (1 - g)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * g + (1 - alpha) * (1 - g)) * loss
    return loss.mean()


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h)."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise GIoU of matching xyxy boxes a[i], b[i] (N,) — the diagonal of DETR's pairwise version."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    lt_c = torch.min(a[:, :2], b[:, :2])
    rb_c = torch.max(a[:, 2:], b[:, 2:])
    area_c = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (area_c - union) / (area_c + eps)


def box_losses(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 summed over the 4 coordinates and averaged over boxes, 1 - GIoU averaged over boxes), over the boxes
    where ``valid`` is True (all when None). Zero (with a gradient path) when no box is valid."""
    if valid is None:
        valid = torch.ones(pred_cxcywh.shape[0], dtype=torch.bool, device=pred_cxcywh.device)
    n = valid.sum().clamp(min=1).to(pred_cxcywh.dtype)
    w = valid.to(pred_cxcywh.dtype)
    l1 = ((pred_cxcywh - target_cxcywh).abs().sum(-1) * w).sum() / n
    giou = 1 - generalized_box_iou(box_cxcywh_to_xyxy(pred_cxcywh), box_cxcywh_to_xyxy(target_cxcywh))
    return l1, (giou * w).sum() / n


@dataclass
class LossOutput:
    """The weighted total and its (unweighted) parts, for logging."""

    total: torch.Tensor
    parts: dict[str, float]


def ssp_sam_loss(logits: torch.Tensor | None, target_mask: torch.Tensor | None, pred_box: torch.Tensor,
                 target_box: torch.Tensor, box_valid: torch.Tensor | None = None, box_only: bool = False,
                 official_no_target_box: bool = False, weights: dict[str, float] | None = None) -> LossOutput:
    """Total loss 4 dice + 4 focal + 5 L1 + 2 GIoU (``box_only``: 5 L1 + 2 GIoU, REC pre-training).

    logits, target_mask: (B, 1, F, F) in the padded SAM frame. pred_box, target_box: (B, 4) cxcywh in [0, 1] of the
    padded CLIP square. box_valid: (B,) bool, False for no-target samples (ignored when
    ``official_no_target_box``: the zero box target is then trained like any other, as in the official code).
    """
    w = {"dice": DICE_WEIGHT, "focal": FOCAL_WEIGHT, "l1": L1_WEIGHT, "giou": GIOU_WEIGHT, **(weights or {})}
    valid = None if official_no_target_box else box_valid
    l1, giou = box_losses(pred_box, target_box, valid)
    total = w["l1"] * l1 + w["giou"] * giou
    parts = {"l1": float(l1.detach()), "giou": float(giou.detach())}
    if not box_only:
        if logits is None or target_mask is None:
            raise ValueError("mask logits and target are required unless box_only=True")
        if logits.shape != target_mask.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target mask {tuple(target_mask.shape)} differ")
        dice = dice_loss(logits, target_mask)
        focal = sigmoid_focal_loss(logits, target_mask)
        total = total + w["dice"] * dice + w["focal"] * focal
        parts.update(dice=float(dice.detach()), focal=float(focal.detach()))
    parts["total"] = float(total.detach())
    return LossOutput(total=total, parts=parts)


def grounding_loss(similarity: torch.Tensor, target_grid: torch.Tensor, valid: torch.Tensor,
                   threshold: float = 0.25) -> torch.Tensor:
    """Auxiliary loss for training CLIP from scratch (the demo; not in the official recipe): BCE between the VAD's
    min-max similarity map (B, N, 1) and the referent's coverage of each CLIP patch (B, N) thresholded at
    ``threshold``, over samples with a target. Pretrained CLIP gives this text-patch alignment for free; without it
    grounding stalls on "segment every shape" (docs/training.md)."""
    if not bool(valid.any()):
        return similarity.sum() * 0.0
    sim = similarity[..., 0][valid].clamp(1e-4, 1 - 1e-4)
    return F.binary_cross_entropy(sim, (target_grid[valid] > threshold).to(sim.dtype))


def referent_patch_loss(patch_logits: torch.Tensor, target_grid: torch.Tensor, threshold: float = 0.25
                        ) -> torch.Tensor:
    """Auxiliary loss for training from scratch (the demo; not in the official recipe): BCE between per-patch logits
    (B, N), read by a linear head from the prompt generator's fused-token outputs, and whether the referent covers
    each CLIP patch (coverage (B, N) > ``threshold``). No-target samples count too (every patch is negative).

    The mask loss reaches the grounding path only through the prompt tokens and SAM's two-way decoder, and from
    random weights that signal is too weak to leave the "segment every shape" plateau in a CPU budget; this one hits
    the cross-modal tokens directly, after the encoder's patch-to-patch attention, so relations can be learned."""
    return F.binary_cross_entropy_with_logits(patch_logits, (target_grid > threshold).to(patch_logits.dtype))
