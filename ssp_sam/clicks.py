"""Simulated clicks, as interactive segmentation measures and trains them (RITM, SAM), and the click prompts' frames.

The next click goes where the prediction is most wrong: the error region (false negatives or false positives)
whose interior point lies deepest, i.e. the larger of the two distance-transform maxima, at that point; positive
for a missed part, negative for an extra one. The mask is zero-padded first so the picture's border counts as a
boundary (RITM's ``get_next_points``). Deterministic (first arg-max) for evaluation; training may draw among the
points at least ``jitter`` x the maximum deep, for variety.

Frames: clicks are found on a mask grid (the model's logit frame, or the original picture) and given to the model
in the SAM input frame (``frame_to_sam_points``, ``original_to_sam_points``), where SAM's prompt encoder takes pixel
coordinates and adds 0.5 itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Click:
    """A click: where (in the frame its maker says: a mask grid's column and row for simulated clicks, continuous
    picture coordinates for an annotator's) and whether it adds (positive) or removes."""

    x: float
    y: float
    positive: bool


def next_click(pred: np.ndarray, gt: np.ndarray, rng: random.Random | None = None, jitter: float = 1.0
               ) -> Click | None:
    """The click an annotator would make next on ``pred`` (H, W bool) against ``gt``; None when they agree."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    fn_depth = _depth(gt & ~pred)
    fp_depth = _depth(pred & ~gt)
    fn_max, fp_max = float(fn_depth.max(initial=0)), float(fp_depth.max(initial=0))
    if max(fn_max, fp_max) <= 0:
        return None
    positive = fn_max >= fp_max
    depth, top = (fn_depth, fn_max) if positive else (fp_depth, fp_max)
    if rng is None or jitter >= 1.0:
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    else:
        ys, xs = np.nonzero(depth >= jitter * top)
        k = rng.randrange(len(ys))
        y, x = ys[k], xs[k]
    return Click(float(x), float(y), positive)


def _depth(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``region`` to its nearest pixel outside it (or outside the picture)."""
    # scipy's exact Euclidean distance transform (nothing in torch or torchvision has one); imported here so the
    # server, which never simulates clicks, does not load scipy
    from scipy.ndimage import distance_transform_edt

    if not region.any():
        return np.zeros(region.shape, dtype=np.float32)
    return distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1].astype(np.float32)


def first_click(gt: np.ndarray, rng: random.Random | None = None, jitter: float = 1.0) -> Click | None:
    """The first click of a clicks-only session: the deepest point of the object (None for an empty mask)."""
    return next_click(np.zeros_like(gt, dtype=bool), gt, rng, jitter)


def click_tensors(clicks: Sequence[Sequence[Click]], grid: int, sam_size: int, device=None) -> tuple:
    """Per-sample click lists found on a ``grid`` x ``grid`` frame (the model's logit frame: the padded SAM square at
    lower resolution) -> SAM point prompts ((B, N, 2) xy in the SAM input frame, (B, N) labels, -1 pads the shorter
    lists)."""
    import torch            # here: the server reads clicks (``Click``) from Label Studio before it loads torch

    n = max(1, max((len(c) for c in clicks), default=0))   # a batch without any click: one padding point each
    coords = torch.zeros(len(clicks), n, 2)
    labels = torch.full((len(clicks), n), -1.0)
    scale = sam_size / grid
    for i, cs in enumerate(clicks):
        for j, c in enumerate(cs):
            coords[i, j, 0] = (c.x + 0.5) * scale - 0.5      # the centre of the frame cell, in SAM pixels
            coords[i, j, 1] = (c.y + 0.5) * scale - 0.5
            labels[i, j] = 1.0 if c.positive else 0.0
    return coords.to(device), labels.to(device)


def click_round(model, embeddings, prompts, chains: list, pred: np.ndarray, gt: np.ndarray, low=None,
                rng: random.Random | None = None, jitter: float = 1.0) -> tuple:
    """One round of simulated sessions on a batch (training and ``evaluate_clicks``): each sample's next click (at the
    largest error of ``pred`` against ``gt``, (B, F, F) bool on the logit frame) is added to its chain in
    ``chains``, then SAM's mask decoder runs with every click so far, the sentence's ``prompts`` (None: plain SAM)
    and ``low`` (the previous low-res logits, detached, as the dense prompt; None: no mask prompt). Returns (logits
    (B, 1, F, F) on the frame, low-res logits)."""
    spec = model.spec
    for i, chain in enumerate(chains):
        c = next_click(pred[i], gt[i], rng, jitter)
        if c is not None:
            chain.append(c)
    points = click_tensors(chains, spec.frame_size, spec.sam_image_size, embeddings.device)
    low = model.decode_masks(embeddings, prompts, points=points, mask_input=None if low is None else low.detach())
    return model.postprocess_logits(low), low


def original_to_sam(xy: np.ndarray, hw: tuple[int, int], sam_size: int) -> np.ndarray:
    """(..., 2) continuous xy on the original picture ((0, 0) its top-left corner, (W, H) its bottom-right) -> SAM
    pixel coordinates (``ResizeLongestSide.apply_coords`` of the pixel the point lies in)."""
    from .transforms import resized_hw   # (ssp_sam.transforms loads torch; ``Click`` alone must not)

    h, w = hw
    nh, nw = resized_hw(h, w, sam_size)
    xy = np.asarray(xy, dtype=np.float32)
    return xy * np.array([nw / w, nh / h], dtype=np.float32) - 0.5


__all__ = ["Click", "next_click", "first_click", "click_tensors", "click_round", "original_to_sam"]
