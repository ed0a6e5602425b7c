"""Samples -> model inputs, shared by training (``ssp_sam.train``) and evaluation (``ssp_sam.evaluate``).

:class:`TrainView` turns each :class:`~ssp_sam.data.Sample` into tensors (CLIP view, SAM view or cached embedding,
frame mask, box target), :func:`collate` stacks them, :func:`forward_batch` runs the model on a batch, and
:func:`precompute_embeddings` embeds every image once for a frozen SAM encoder.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch

from ssp_sam.data import Sample
from ssp_sam.transforms import box_to_clip_frame, clip_input, mask_to_clip_grid, mask_to_frame, sam_input


class TrainView(torch.utils.data.Dataset):
    """Turns Samples into model inputs and targets.

    The SAM view (or its cached embedding) and the frame mask do not change between epochs, so they are computed once
    and kept (SAM input as float16). The CLIP view is rebuilt each time: with ``augment`` the image is placed at a
    random spot of the padded square, drawn from (seed, epoch, index) so runs and resumes are reproducible and every
    process draws the same placement for a sample. ``clip_grid`` adds the mask's coverage of each CLIP patch (the
    referent-patch loss's target).
    """

    def __init__(self, samples: Sequence[Sample], spec, augment: bool, seed: int = 0,
                 embeddings: Mapping[int, torch.Tensor] | None = None, cache: bool = True,
                 clip_grid: bool = False) -> None:
        self.samples, self.spec, self.augment, self.seed = samples, spec, augment, seed
        self.clip_grid = clip_grid
        self.embeddings = embeddings
        self.cache = cache
        self._sam: dict[int, torch.Tensor] = {}
        self._mask: dict[int, torch.Tensor] = {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def sam_view(self, i: int, s: Sample) -> torch.Tensor:
        if i in self._sam:
            return self._sam[i].float()
        x = sam_input(s.image, self.spec.sam_image_size).half()  # float16 always, cached or not (reproducible)
        if self.cache:
            self._sam[i] = x
        return x.float()

    def frame_mask(self, i: int, s: Sample) -> torch.Tensor:
        if i in self._mask:
            return self._mask[i].float()
        m = mask_to_frame(s.mask, self.spec.sam_image_size, self.spec.frame_size)
        if self.cache:
            self._mask[i] = m.bool()
        return m

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        if self.augment:
            rng = random.Random(hash((self.seed, self.epoch, i)))
            clip, meta = clip_input(s.image, self.spec.clip_image_size, "random", rng)
        else:
            clip, meta = clip_input(s.image, self.spec.clip_image_size, "center")
        valid = s.box_xyxy is not None and bool(s.mask.any())
        box = box_to_clip_frame(s.box_xyxy, meta) if valid else torch.zeros(4)
        item = {"clip": clip, "mask": self.frame_mask(i, s), "box": box.float(), "valid": valid,
                "sentence": s.sentence, "index": i}
        if self.clip_grid:
            item["grid"] = mask_to_clip_grid(s.mask, meta, self.spec.clip_patch_size)
        if self.embeddings is not None and i in self.embeddings:
            item["emb"] = self.embeddings[i].float()
        else:
            item["sam"] = self.sam_view(i, s)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of TrainView items into a batch (sentences stay a list)."""
    out: dict[str, Any] = {"sentence": [it["sentence"] for it in items],
                           "index": torch.tensor([it["index"] for it in items]),
                           "valid": torch.tensor([it["valid"] for it in items])}
    for k in ("clip", "sam", "emb", "mask", "box", "grid"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out


def forward_batch(model, batch: dict[str, Any], tokenizer, device: torch.device, box_only: bool = False):
    """The model's output (``SSPSAMOutput``) on a collated batch: cached SAM embeddings when the batch has them, else
    the SAM view through the image encoder."""
    ids = tokenizer(batch["sentence"]).to(device)
    clip = batch["clip"].to(device)
    if "emb" in batch:
        return model(batch["emb"].to(device), clip, ids, box_only=box_only)
    return model(None, clip, ids, sam_images=batch["sam"].to(device), box_only=box_only)


@torch.no_grad()
def precompute_embeddings(model, samples: Sequence[Sample], spec, batch_size: int = 16,
                          device: torch.device | None = None, progress: bool = False) -> dict[int, torch.Tensor]:
    """SAM image embeddings of every sample, computed once (float16, in memory) for a frozen encoder."""
    from tqdm import tqdm

    device = device or next(model.parameters()).device
    out: dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc="embed", disable=not progress):
        idx = list(range(start, min(start + batch_size, len(samples))))
        x = torch.stack([sam_input(samples[i].image, spec.sam_image_size) for i in idx]).to(device)
        emb = model.encode_image(x).cpu().half()
        out.update({i: emb[k] for k, i in enumerate(idx)})
    return out


__all__ = ["TrainView", "collate", "forward_batch", "precompute_embeddings"]
