"""Image and mask transforms: the SAM and CLIP inputs and the mask frames (reading pictures: ``ssp_sam.images``).

Frames: SAM sees the image resized so its longest side is ``S_sam`` (``ResizeLongestSide``), normalised and
zero-padded at the bottom/right to a square. SSP-SAM's logits live in that padded square at half resolution
(512x512 for S_sam = 1024), with the image in the top-left corner. ``frame_to_original`` undoes this.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F
from torchvision.transforms.functional import resize, to_pil_image

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide target size (int(x + 0.5) rounding), at least 1 pixel per side: the short side of a
    1x4000 picture would otherwise round to 0. Every other size is SAM's own."""
    nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, size)
    return max(1, nh), max(1, nw)


def sam_input(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 image -> (3, size, size) float: longest side resized, SAM-normalised, zero-padded bottom/right.
    The resize is ``ResizeLongestSide.apply_image``'s, to the size of ``resized_hw``."""
    resized = np.array(resize(to_pil_image(image), resized_hw(image.shape[0], image.shape[1], size)))
    x = torch.as_tensor(resized).permute(2, 0, 1).float()
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, size - x.shape[2], 0, size - x.shape[1]))


@dataclass
class ClipMeta:
    ratio: float            # new / old
    resized_hw: tuple[int, int]
    pad_left_top: tuple[int, int]
    size: int


def clip_input(image: np.ndarray, size: int, placement: str | tuple[int, int] = "center",
               rng: random.Random | None = None) -> tuple[torch.Tensor, ClipMeta]:
    """The official CLIP branch: long side to ``size`` (PIL bilinear, Python ``round``), CLIP-normalised, pasted
    into a zero square, centred at test time or at a random place in training (``placement="random"``)."""
    h, w = image.shape[:2]
    ratio = size / max(h, w)
    new_h, new_w = max(1, round(h * ratio)), max(1, round(w * ratio))     # a 1x4000 picture keeps 1 pixel
    pil = Image.fromarray(image)
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
    x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    if placement == "center":
        top, left = round((size - new_h) / 2 - 0.1), round((size - new_w) / 2 - 0.1)
    elif placement == "random":
        r = rng or random
        top, left = r.randint(0, size - new_h), r.randint(0, size - new_w)
    else:
        left, top = placement
    out = torch.zeros(3, size, size)
    out[:, top:top + new_h, left:left + new_w] = x
    return out, ClipMeta(ratio, (new_h, new_w), (left, top), size)


def box_to_clip_frame(box_xyxy, meta: ClipMeta) -> torch.Tensor:
    """Pixel box (x0, y0, x1, y1) -> (cx, cy, w, h) normalised to the padded CLIP square (the box head's target)."""
    x0, y0, x1, y1 = (float(v) * meta.ratio for v in box_xyxy)
    left, top = meta.pad_left_top
    x0, x1, y0, y1 = x0 + left, x1 + left, y0 + top, y1 + top
    s = float(meta.size)
    return torch.tensor([(x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s])


def box_from_clip_frame(box_cxcywh, meta: ClipMeta, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of ``box_to_clip_frame``, clipped to the image: (x0, y0, x1, y1) in original pixels."""
    cx, cy, bw, bh = (float(v) * meta.size for v in box_cxcywh)
    left, top = meta.pad_left_top
    x0, x1 = (cx - bw / 2 - left) / meta.ratio, (cx + bw / 2 - left) / meta.ratio
    y0, y1 = (cy - bh / 2 - top) / meta.ratio, (cy + bh / 2 - top) / meta.ratio
    h, w = hw
    return np.array([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], dtype=np.float32)


def mask_to_frame(mask: np.ndarray, sam_size: int, frame_size: int) -> torch.Tensor:
    """GT mask (H, W) -> (frame, frame) float {0, 1} in the padded SAM frame, as the official pipeline builds it:
    longest side to ``sam_size`` (PIL bilinear on a float image, then > 0), zero pad, nearest to ``frame_size``."""
    h, w = mask.shape
    nh, nw = resized_hw(h, w, sam_size)
    img = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    m = torch.from_numpy((np.asarray(img) > 0).astype(np.float32))
    m = F.pad(m, (0, sam_size - nw, 0, sam_size - nh))
    return F.interpolate(m[None, None], (frame_size, frame_size), mode="nearest")[0, 0]


def frame_to_original(frame_logits: torch.Tensor, hw: tuple[int, int], sam_size: int) -> torch.Tensor:
    """(F, F) logits in the padded frame -> (H, W) logits at the original resolution: upscale to the SAM square,
    crop the resized image, resize to (H, W) (all bilinear)."""
    h, w = hw
    nh, nw = resized_hw(h, w, sam_size)
    x = frame_logits.float()[None, None]
    x = F.interpolate(x, (sam_size, sam_size), mode="bilinear", align_corners=False)[..., :nh, :nw]
    if (nh, nw) == (h, w):      # a picture already at the SAM size: the second resize would be the identity
        return x[0, 0]
    return F.interpolate(x, (h, w), mode="bilinear", align_corners=False)[0, 0]


def mask_to_clip_grid(mask: np.ndarray, meta: ClipMeta, patch: int) -> torch.Tensor:
    """Fraction of each CLIP patch covered by the mask, (N,) in CLIP token order: the mask placed exactly as the
    image is in the padded CLIP square (``clip_input``), then averaged over ``patch`` x ``patch`` cells."""
    nh, nw = meta.resized_hw
    left, top = meta.pad_left_top
    m = Image.fromarray(np.asarray(mask, dtype=np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    canvas = torch.zeros(meta.size, meta.size)
    canvas[top:top + nh, left:left + nw] = torch.from_numpy(np.array(m))
    return F.avg_pool2d(canvas[None, None], patch)[0, 0].flatten()
