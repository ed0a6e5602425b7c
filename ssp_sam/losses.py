"""SSP-SAM training losses, with the official code's weights and formulas.

Mask: 4 x dice + 4 x sigmoid focal (alpha 0.25, gamma 2, mean over pixels) on the (B, 1, F, F) logits against the
GT in the same padded SAM frame. Box (auxiliary REC loss on the REG-token box, (cx, cy, w, h) normalised to the
padded CLIP square): 5 x L1 + 2 x GIoU. Focal loss, GIoU and box conversions are ``torchvision.ops``'.

No-target samples (GRES). The official code trains them with an all-zero mask (the dice term then pushes every
probability to 0: with g = 0 it is 1 - 1 / (sum p + 1)) and with a degenerate all-zero box target, so the box head
learns to point at the top-left corner for "nothing". That target carries no information and its gradient competes
with the real boxes, so no-target samples are left out of the box losses (``box_valid``; L1 and GIoU are averaged
over the valid boxes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

DICE_WEIGHT = 4.0
FOCAL_WEIGHT = 4.0
L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(pg) + 1) / (sum p + sum g + 1) per sample on sigmoid probabilities, summed over the batch and
    divided by the batch size (the official formula: the +1 sits in numerator and denominator)."""
    b = logits.shape[0]
    p = logits.sigmoid().flatten(1)
    g = target.flatten(1).to(p.dtype)
    num = 2 * (p * g).sum(1) + 1
    den = p.sum(1) + g.sum(1) + 1
    return (1 - num / den).sum() / max(b, 1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary focal loss of the official recipe: alpha 0.25, gamma 2, mean over every pixel of the batch."""
    return sigmoid_focal_loss(logits, target.to(logits.dtype), alpha=0.25, gamma=2.0, reduction="mean")


def box_losses(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 summed over the 4 coordinates and averaged over boxes, 1 - GIoU averaged over boxes), over the boxes
    where ``valid`` is True (all when None). Zero (with a gradient path) when no box is valid."""
    if valid is None:
        valid = torch.ones(pred_cxcywh.shape[0], dtype=torch.bool, device=pred_cxcywh.device)
    n = valid.sum().clamp(min=1).to(pred_cxcywh.dtype)
    w = valid.to(pred_cxcywh.dtype)
    l1 = ((pred_cxcywh - target_cxcywh).abs().sum(-1) * w).sum() / n
    giou = generalized_box_iou_loss(box_convert(pred_cxcywh, "cxcywh", "xyxy"),
                                    box_convert(target_cxcywh, "cxcywh", "xyxy"), reduction="none")
    return l1, (giou * w).sum() / n


@dataclass
class LossOutput:
    """The weighted total and its (unweighted) parts, for logging."""

    total: torch.Tensor
    parts: dict[str, float]


def ssp_sam_loss(logits: torch.Tensor | None, target_mask: torch.Tensor | None, pred_box: torch.Tensor,
                 target_box: torch.Tensor, box_valid: torch.Tensor | None = None, box_only: bool = False,
                 weights: dict[str, float] | None = None) -> LossOutput:
    """Total loss 4 dice + 4 focal + 5 L1 + 2 GIoU (``box_only``: 5 L1 + 2 GIoU, REC pre-training).

    logits, target_mask: (B, 1, F, F) in the padded SAM frame. pred_box, target_box: (B, 4) cxcywh in [0, 1] of the
    padded CLIP square. box_valid: (B,) bool, False for no-target samples (left out of the box losses).
    """
    w = {"dice": DICE_WEIGHT, "focal": FOCAL_WEIGHT, "l1": L1_WEIGHT, "giou": GIOU_WEIGHT, **(weights or {})}
    l1, giou = box_losses(pred_box, target_box, box_valid)
    total = w["l1"] * l1 + w["giou"] * giou
    parts = {"l1": float(l1.detach()), "giou": float(giou.detach())}
    if not box_only:
        if logits is None or target_mask is None:
            raise ValueError("mask logits and target are required unless box_only=True")
        if logits.shape != target_mask.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target mask {tuple(target_mask.shape)} differ")
        dice, focal = dice_loss(logits, target_mask), focal_loss(logits, target_mask)
        total = total + w["dice"] * dice + w["focal"] * focal
        parts.update(dice=float(dice.detach()), focal=float(focal.detach()))
    parts["total"] = float(total.detach())
    return LossOutput(total=total, parts=parts)


def mask_loss(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The recipe's mask part alone, 4 dice + 4 focal: the loss of a click round (``ssp_sam.train``), where the box
    head has nothing new to learn."""
    return DICE_WEIGHT * dice_loss(logits, target_mask) + FOCAL_WEIGHT * focal_loss(logits, target_mask)


def referent_patch_loss(patch_logits: torch.Tensor, target_grid: torch.Tensor, threshold: float = 0.25
                        ) -> torch.Tensor:
    """Auxiliary loss for training from scratch (the demo; not in the official recipe): BCE between per-patch logits
    (B, N), read by a linear head from the prompt generator's fused-token outputs, and whether the referent covers
    each CLIP patch (coverage (B, N) > ``threshold``). No-target samples count too (every patch is negative).

    The mask loss reaches the grounding path only through the prompt tokens and SAM's two-way decoder, and from
    random weights that signal is too weak to leave the "segment every shape" plateau in a CPU budget; this one hits
    the cross-modal tokens directly, after the encoder's patch-to-patch attention, so relations can be learned."""
    return F.binary_cross_entropy_with_logits(patch_logits, (target_grid > threshold).to(patch_logits.dtype))


__all__ = ["dice_loss", "focal_loss", "box_losses", "ssp_sam_loss", "mask_loss", "referent_patch_loss", "LossOutput",
           "DICE_WEIGHT", "FOCAL_WEIGHT", "L1_WEIGHT", "GIOU_WEIGHT"]
