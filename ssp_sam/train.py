"""Training and evaluation loop for SSP-SAM, readable top to bottom (config, data, model, optimiser, loop, eval,
checkpoints), in the spirit of nanoGPT's ``train.py``.

Recipe (ssp-sam-model.md §9): loss 4 dice + 4 focal + 5 L1 + 2 GIoU (``ssp_sam.losses``); AdamW, weight decay 1e-4;
two parameter groups (new modules ``lr``, SAM mask decoder ``lr_decoder``); linear warm-up from ``lr_min`` then
cosine to ``lr_min`` (stepped per optimiser step by default, ``schedule="epoch"`` steps once per epoch like the
official timm scheduler); gradient clipping at global norm 0.1; mask decoder frozen for the first
``freeze_decoder_epochs`` epochs; seed 3407 + rank; CLIP and the SAM image encoder frozen unless the variant (the
demo) or ``train_clip`` / ``train_sam_encoder`` says otherwise; random placement of the image in the padded CLIP
square (box target shifted; the SAM view and GT mask stay fixed, as official).

Data parallel: ``torchrun --nproc_per_node=N -m backend.cli train ...`` (gloo on CPU, NCCL on GPU). Each rank reads
its shard (``DistributedSampler``); gradients are averaged with one ``all_reduce`` per step over a flat buffer (the
same arithmetic as ``DistributedDataParallel`` without its hooks, so freezing and unfreezing modules mid-run needs no
re-wrapping); rank 0 logs and writes files.

Files in ``out_dir``: ``last.pt`` (full training state; resumes exactly: model, optimiser, scheduler, epoch, step, RNG
states, config), ``best.pt`` (a model bundle, best validation mIoU), ``log.csv`` (per logging step), ``epochs.csv``
(per-epoch metrics), ``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ssp_sam.data import Sample
from ssp_sam.losses import grounding_loss, referent_patch_loss, ssp_sam_loss
from ssp_sam.metrics import MetricAccumulator, empty_threshold, format_table
from ssp_sam.transforms import (box_to_clip_frame, clip_input, frame_to_original, hflip_sample, mask_to_clip_grid,
                                mask_to_frame, sam_input)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run needs. Every field is also a ``ssp-sam train --field-name`` option."""

    # data (used when train_set / val_set are not passed to ``train``; see ssp_sam.data.datasets.load_dataset)
    train_data: str = "synthetic:2000"       # "synthetic:N[:seed=S][:domain=D]" | file.jsonl | official:ROOT:DS:SPLIT
    val_data: str = "synthetic:200:seed=1"
    # model
    variant: str = "demo"
    init_checkpoint: str | None = None       # weights to start from (bundle or official .pth)
    train_clip: bool | None = None           # None: what the variant says (only the demo/tiny train CLIP)
    train_sam_encoder: bool | None = None
    # optimisation
    epochs: int = 10
    batch_size: int = 8                      # per process
    lr: float = 1e-4                         # new modules (SSP encoder, prompt generator, box head; CLIP/SAM encoder
    lr_decoder: float = 1e-5                 # SAM mask decoder                               when trained)
    lr_min: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    schedule: str = "step"                   # "step": cosine per optimiser step; "epoch": per epoch (official);
                                             # "time": over the wall-clock budget time_limit_min (the demo)
    clip_grad: float = 0.1
    freeze_decoder_epochs: int = 20
    box_only: bool = False                   # REC pre-training: box losses only, SAM not run
    ground_first_min: float = 0.0            # grounding warm-up: the first minutes of wall time train box_only
                                             # (box + auxiliary losses, SAM not run, ~3x cheaper steps); 0 = off
    official_no_target_box: bool = False     # train no-target samples towards a zero box (official) instead of
    aug_translate: bool = True               # masking their box loss (ssp_sam/losses.py)
    aug_flip: float = 0.0                    # probability of a left-right mirror with "left"/"right" swapped in the
                                             # sentence (transforms.hflip_sample); 0 = official (no flip)
    sentences_per_image: int = 1             # K > 1: batches take K sentences of one image at a time (samples grouped
                                             # by image_key); the image encoders run once per image; 1 = official
    seed: int = 3407
    max_steps: int | None = None             # stop after this many optimiser steps (tests, smoke runs)
    time_limit_min: float | None = None      # stop (then evaluate and save) after this wall time
    # evaluation and output
    out_dir: str = "runs/train"
    eval_every: int = 1                      # epochs
    eval_batch_size: int = 16
    val_max_samples: int | None = None
    save_checkpoints: bool = True
    resume: str | None = None                # a last.pt to continue from ("auto": out_dir/last.pt if present)
    embeddings_dir: str | None = None        # cached SAM embeddings (ssp-sam embed); used when the encoder is frozen
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 25
    progress: bool = True
    threads: int | None = None               # torch.set_num_threads for CPU runs
    token_init_std: float | None = None      # re-initialise the prompt generator's position/REG/prompt tables with
                                             # this std before training (from-scratch runs; official init is N(0, 1))
    grounding_loss_weight: float = 0.0       # auxiliary similarity-map loss (losses.grounding_loss); 0 = official
    patch_loss_weight: float = 0.0           # auxiliary referent-patch loss (losses.referent_patch_loss) through a
                                             # training-only linear head; 0 = official
    patch_head_fit_steps: int = 0            # > 0: before training, fit that head alone on the start model's
                                             # outputs (a linear probe; fine-tuning from a bundle, which has no head)


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo model (docs/training.md): from scratch on the synthetic benchmark within a wall-clock budget
    # (cosine over time), higher lr, no decoder freeze (the decoder is random too), the small SAM encoder trained
    # with the rest, no CLIP translation (both views are learned from scratch), and the auxiliary referent-patch loss
    # (without it the run never leaves "segment every shape" in a CPU budget), its first 8 minutes box-only (grounding
    # warm-up: ~3x cheaper steps for the text/grounding side). Run it as two processes, one per core:
    # `torchrun --standalone --nproc_per_node 2 bench/train_demo.py`.
    "demo": dict(variant="demo", train_data="synthetic:12000:seed=0", val_data="synthetic:300:seed=1",
                 train_sam_encoder=True, epochs=8, batch_size=8, lr=4e-4, lr_decoder=4e-4, lr_min=1e-5,
                 warmup_epochs=0.2, schedule="time", time_limit_min=24.0, freeze_decoder_epochs=0, clip_grad=1.0,
                 aug_translate=False, token_init_std=0.02, patch_loss_weight=20.0, ground_first_min=8.0,
                 out_dir="runs/demo", eval_batch_size=32, log_every=50, threads=1),
    # The official fine-tuning recipe (SSP-SAM-224 on RefCOCO, 8 GPUs x 8).
    "official-224": dict(variant="ssp-sam-224", epochs=80, batch_size=8, lr=1e-4, lr_decoder=1e-5, lr_min=1e-6,
                         warmup_epochs=5, schedule="epoch", freeze_decoder_epochs=20, clip_grad=0.1),
    # A few CPU seconds: tests.
    "tiny": dict(variant="tiny", train_data="synthetic:32", val_data="synthetic:16:seed=1", epochs=1,
                 batch_size=4, lr=1e-3, lr_decoder=1e-3, warmup_epochs=0.0, freeze_decoder_epochs=0,
                 progress=False, log_every=1),
}


def config_from_preset(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig with a preset's values, then the overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


@dataclass
class TrainResult:
    """What ``train`` returns."""

    history: list[dict[str, float]]          # one dict per epoch: train loss parts and validation metrics
    best_metrics: dict[str, float]           # validation metrics of the best epoch ({} without a val set)
    best_epoch: int | None
    best_path: Path | None                   # best.pt bundle (rank 0, save_checkpoints)
    last_path: Path | None
    steps: int
    wall_time_s: float
    model: Any = None                        # the trained model (best weights are in best_path, not loaded back)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (env WORLD_SIZE > 1); returns (rank, world, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _dist_info()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        torch.cuda.set_device(device)
    return rank, world, device


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` as one flat buffer; missing grads count as zero."""
    if world <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _broadcast_parameters(model: torch.nn.Module) -> None:
    rank, world = _dist_info()
    if world > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------------------------------------------------
# Data: Sample -> tensors


class TrainView(torch.utils.data.Dataset):
    """Turns Samples into model inputs and targets.

    The SAM view (or its cached embedding) and the frame mask do not change between epochs, so they are computed once
    and kept (SAM input as float16). The CLIP view is rebuilt each time: with ``augment`` the image is placed at a
    random spot of the padded square, drawn from (seed, epoch, index) so runs and resumes are reproducible. With
    ``flip`` > 0 a sample is mirrored (sentence's left/right swapped) with that probability, drawn the same way; the
    mirrored views are cached under key ``-1 - index`` (and ``embeddings`` must hold them under that key too).

    ``groups`` (one image id per sample, :func:`~ssp_sam.data.datasets.image_groups`): the samples of one image get
    the same placement and mirror decision, one cached SAM view, and an ``"image"`` id that :func:`collate` uses to
    batch each image once (several sentences per image, ``TrainConfig.sentences_per_image``).
    """

    def __init__(self, samples: Sequence[Sample], spec, augment: bool, seed: int = 0,
                 embeddings: dict[int, torch.Tensor] | None = None, cache: bool = True,
                 clip_grid: bool = False, flip: float = 0.0, groups: Sequence[int] | None = None) -> None:
        self.samples, self.spec, self.augment, self.seed = samples, spec, augment, seed
        self.flip = flip
        self.groups = groups
        self.clip_grid = clip_grid                # also yield the mask's CLIP-patch coverage (auxiliary losses)
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
        s, key = self.samples[i], i                                   # key: per-sample caches (mask, embedding)
        gid = self.groups[i] if self.groups is not None else i
        image = gid                                                   # image: the SAM view's cache, batching
        if self.flip > 0 and random.Random(hash((self.seed, self.epoch, gid, 1))).random() < self.flip:
            s, key, image = hflip_sample(s), -1 - i, -1 - gid
        if self.augment:
            rng = random.Random(hash((self.seed, self.epoch, gid)))
            clip, meta = clip_input(s.image, self.spec.clip_image_size, "random", rng)
        else:
            clip, meta = clip_input(s.image, self.spec.clip_image_size, "center")
        valid = s.box_xyxy is not None and bool(s.mask.any())
        box = box_to_clip_frame(s.box_xyxy, meta) if valid else torch.zeros(4)
        item = {"clip": clip, "mask": self.frame_mask(key, s), "box": box.float(), "valid": valid,
                "sentence": s.sentence, "index": i}
        if self.clip_grid:
            item["grid"] = mask_to_clip_grid(s.mask, meta, self.spec.clip_patch_size)
        if self.embeddings is not None and key in self.embeddings:
            item["emb"] = self.embeddings[key].float()
        else:
            item["sam"] = self.sam_view(image, s)
        if self.groups is not None:
            item["image"] = image
        return item


class ImageGroupBatchSampler:
    """Batches of up to ``batch_size`` sentences made of runs of up to ``per_image`` sentences of one image.

    Each epoch (``set_epoch``) shuffles every image's sentences, cuts them into runs of ``per_image``, shuffles the
    runs and packs them, whole, into batches; a batch that is not full when the next run does not fit is closed
    (smaller). Every rank computes the same list and takes every ``world``-th batch, cut to the same count on all
    ranks (DistributedDataParallel needs equal step counts). A function of (seed, epoch): resumable.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, per_image: int, rank: int = 0, world: int = 1,
                 seed: int = 0) -> None:
        if per_image < 1 or batch_size < 1:
            raise ValueError("batch_size and per_image must be >= 1")
        self.by_image: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            self.by_image.setdefault(int(g), []).append(i)
        self.batch_size, self.per_image = batch_size, min(per_image, batch_size)
        self.rank, self.world, self.seed = rank, world, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = random.Random(self.seed * 1000 + epoch)
        runs = []
        for idx in self.by_image.values():
            idx = list(idx)
            rng.shuffle(idx)
            runs += [idx[j:j + self.per_image] for j in range(0, len(idx), self.per_image)]
        rng.shuffle(runs)
        batches, cur = [], []
        for run in runs:
            if cur and len(cur) + len(run) > self.batch_size:
                batches.append(cur)
                cur = []
            cur = cur + run
        if len(cur) == self.batch_size:
            batches.append(cur)
        n = len(batches) // self.world
        self._batches = batches[self.rank::self.world][:n]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        return iter(self._batches)


class _Mirrored:
    """A read-only view of a sample sequence, every sample mirrored (``hflip_sample``)."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return hflip_sample(self.samples[i])


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of TrainView items into a batch. Items with an ``"image"`` id (grouped views) give each image's
    inputs (``clip``, ``sam``, ``emb``) once, plus ``image_index``: the image row of every sentence."""
    out: dict[str, Any] = {"sentence": [it["sentence"] for it in items],
                           "index": torch.tensor([it["index"] for it in items]),
                           "valid": torch.tensor([it["valid"] for it in items])}
    images = items
    if "image" in items[0]:
        first: dict[int, dict[str, Any]] = {}  # image id -> its first item (insertion order = row)
        for it in items:
            first.setdefault(it["image"], it)
        rows = {image: row for row, image in enumerate(first)}
        out["image_index"] = torch.tensor([rows[it["image"]] for it in items])
        images = list(first.values())
    for k in ("clip", "sam", "emb"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in images])
    for k in ("mask", "box", "grid"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out


def _forward(model, batch: dict[str, Any], tokenizer, device: torch.device, box_only: bool = False):
    ids = tokenizer(batch["sentence"]).to(device)
    clip = batch["clip"].to(device)
    index = batch["image_index"].to(device) if "image_index" in batch else None
    if "emb" in batch:
        return model(batch["emb"].to(device), clip, ids, box_only=box_only, image_index=index)
    return model(None, clip, ids, sam_images=batch["sam"].to(device), box_only=box_only, image_index=index)


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


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_model(model, tokenizer, dataset: Sequence[Sample], batch_size: int = 16, device: str | None = None,
                   original_resolution: bool = True, by_kind: bool = True, max_samples: int | None = None,
                   progress: bool = False, threshold: float = 0.0,
                   embeddings: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Referring-segmentation metrics of ``model`` on ``dataset`` (a sequence of Samples).

    Returns ``{"mIoU", "oIoU", "gIoU", "cIoU", "Pr@0.50".."Pr@0.90", "N-acc", "T-acc", "n", "n_empty"}`` computed in
    the padded SAM frame (official), the same keys prefixed ``orig/`` at original resolution, and
    ``<kind>/mIoU`` per ``sample.meta["kind"]`` when ``by_kind``. ``threshold``: logit threshold (0 = sigmoid 0.5).
    Under torch.distributed every rank scores its shard and all ranks get the merged result.
    """
    from tqdm import tqdm

    rank, world = _dist_info()
    spec = model.spec
    dev = torch.device(device) if device else next(model.parameters()).device
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = list(range(rank, n, world))
    view = TrainView(dataset, spec, augment=False, embeddings=embeddings, cache=False)
    was_training = model.training
    model.eval()
    frame_acc, orig_acc = MetricAccumulator(), MetricAccumulator()
    frame_thr = empty_threshold(spec.frame_size)
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="eval", disable=not progress or rank != 0):
            items = [view[i] for i in indices[start:start + batch_size]]
            batch = collate(items)
            out = _forward(model, batch, tokenizer, dev)
            logits = out.logits[:, 0].float().cpu()
            for k, it in enumerate(items):
                s = dataset[it["index"]]
                group = s.meta.get("kind") if by_kind else None
                frame_acc.add((logits[k] > threshold).numpy(), it["mask"].numpy() > 0.5, frame_thr, group)
                if original_resolution:
                    h, w = s.mask.shape
                    orig = frame_to_original(logits[k], (h, w), spec.sam_image_size) > threshold
                    orig_acc.add(orig.numpy(), s.mask, empty_threshold(max(h, w)), group)
    finally:
        model.train(was_training)
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, (frame_acc.state(), orig_acc.state()))
        frame_acc, orig_acc = MetricAccumulator(), MetricAccumulator()
        for f_state, o_state in states:
            frame_acc.merge(MetricAccumulator.from_state(f_state))
            orig_acc.merge(MetricAccumulator.from_state(o_state))
    metrics = frame_acc.compute(by_group=by_kind)
    if original_resolution:
        metrics.update({f"orig/{k}": v for k, v in orig_acc.compute().items()})
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: the SAM mask decoder (``lr_decoder``) and every other trainable parameter (``lr``).
    The decoder group holds its parameters even while they are frozen (AdamW skips parameters without a grad)."""
    decoder = list(model.sam.mask_decoder.parameters())
    decoder_ids = {id(p) for p in decoder}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in decoder_ids]
    return [{"params": others, "lr": cfg.lr, "name": "main"},
            {"params": decoder, "lr": cfg.lr_decoder, "name": "mask_decoder"}]


def lr_factor(t: float, total: float, warmup: float, base: float, lr_min: float) -> float:
    """Multiplier of ``base`` at time t: linear warm-up from lr_min, then cosine down to lr_min at ``total``."""
    floor = min(lr_min / base, 1.0) if base > 0 else 0.0
    if warmup > 0 and t < warmup:
        return floor + (1 - floor) * t / warmup
    span = max(total - warmup, 1e-9)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _set_decoder_trainable(model, trainable: bool) -> None:
    from ssp_sam.build import set_trainable

    set_trainable(model, train_mask_decoder=trainable)  # the model's own rules (e.g. unused decoder heads stay off)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, model=None, tokenizer=None, train_set: Sequence[Sample] | None = None,
          val_set: Sequence[Sample] | None = None,
          on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None) -> TrainResult:
    """Train ``model`` (built from ``cfg.variant`` / ``cfg.init_checkpoint`` when None) on ``train_set`` (a sequence
    of Samples; loaded from ``cfg.train_data`` when None), validating on ``val_set`` every ``eval_every`` epochs.

    ``on_epoch_end(record)`` gets each epoch's record (train loss parts, lr, validation metrics as ``val/<key>``);
    returning True stops training. Returns a TrainResult (history, best metrics, paths); the model is left with its
    final (not best) weights, in eval mode. Note: ``cfg.train_clip`` / ``cfg.train_sam_encoder`` replace
    ``model.spec``, and ``cfg.token_init_std`` re-initialises token tables (from-scratch runs only).
    """
    from tqdm import tqdm

    from ssp_sam.build import resolve_device, set_trainable

    t_start = time.time()
    # --- setup: device, processes, seed ----------------------------------------------------------------------------
    device = resolve_device(cfg.device)
    rank, world, device = init_distributed(device)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)
    if master and cfg.save_checkpoints:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- model and tokenizer -----------------------------------------------------------------------------------------
    if model is None:
        model, tok0 = _build_for_training(cfg)
        tokenizer = tokenizer or tok0
    if tokenizer is None:
        from ssp_sam.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(model.spec)
    spec = model.spec
    overrides = {k: v for k, v in (("train_clip", cfg.train_clip), ("train_sam_encoder", cfg.train_sam_encoder))
                 if v is not None}
    if overrides:
        model.spec = spec = dataclasses.replace(spec, **overrides)
    if cfg.token_init_std and not cfg.resume:
        model.prompt_generator.init_token_tables(cfg.token_init_std)
    model.to(device)
    set_trainable(model, train_mask_decoder=True)
    _broadcast_parameters(model)

    # --- data --------------------------------------------------------------------------------------------------------
    if train_set is None:
        from ssp_sam.data.datasets import load_dataset
        train_set = load_dataset(cfg.train_data, train=True, progress=cfg.progress and master)
    if val_set is None and cfg.val_data:
        from ssp_sam.data.datasets import load_dataset
        val_set = load_dataset(cfg.val_data, train=False, progress=False)
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    train_emb = val_emb = None
    if cfg.embeddings_dir and not spec.train_sam_encoder and not cfg.box_only:
        # cached by `ssp-sam embed` (SAM never runs here)
        if cfg.aug_flip > 0:
            raise ValueError("--aug-flip needs the SAM embeddings of mirrored images: run without --embeddings-dir "
                             "(they are then computed in memory) or set --aug-flip 0")
        from ssp_sam.embed import EmbeddingStore

        train_emb = EmbeddingStore(cfg.embeddings_dir, train_set)
        val_emb = EmbeddingStore(cfg.embeddings_dir, val_set) if val_set is not None else None
        for name, store in (("train", train_emb), ("val", val_emb)):
            missing = store.missing() if store is not None else []
            if missing:
                raise FileNotFoundError(f"{len(missing)} {name} images have no embedding in {cfg.embeddings_dir}; "
                                        f"run `ssp-sam embed --data ... --out {cfg.embeddings_dir}` first")
    elif not spec.train_sam_encoder and not cfg.box_only and model.sam.image_encoder is not None:
        # frozen encoder: embed every image once, never per step
        train_emb = precompute_embeddings(model, train_set, spec, device=device, progress=cfg.progress and master)
        if cfg.aug_flip > 0:  # the mirrored images have embeddings of their own (TrainView key -1 - i)
            flipped = precompute_embeddings(model, _Mirrored(train_set), spec, device=device)
            train_emb.update({-1 - i: e for i, e in flipped.items()})
        val_emb = precompute_embeddings(model, val_set, spec, device=device) if val_set is not None else None
    clip_grid = cfg.patch_loss_weight > 0 or (cfg.grounding_loss_weight > 0 and not cfg.box_only)
    image_ids = None
    if cfg.sentences_per_image > 1:  # several sentences of one image per batch: its encoders run once
        from ssp_sam.data.datasets import image_groups
        image_ids = image_groups(train_set)
    view = TrainView(train_set, spec, augment=cfg.aug_translate, seed=cfg.seed, embeddings=train_emb,
                     flip=cfg.aug_flip, clip_grid=clip_grid, groups=image_ids)
    g = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, max(1, len(view) // world))
    sampler = batch_sampler = None
    if image_ids is not None:
        batch_sampler = ImageGroupBatchSampler(image_ids, batch_size, cfg.sentences_per_image, rank, world,
                                               cfg.seed)
        if len(batch_sampler) == 0:
            raise ValueError(f"too few samples for one batch of {batch_size} per process")
        loader = DataLoader(view, batch_sampler=batch_sampler, collate_fn=collate, num_workers=cfg.num_workers)
    else:
        sampler = DistributedSampler(view, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True) if world > 1 else None
        loader = DataLoader(view, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                            collate_fn=collate, num_workers=cfg.num_workers, generator=g)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # --- optimiser, schedule -----------------------------------------------------------------------------------------
    groups = param_groups(model, cfg)
    patch_head = None
    if cfg.patch_loss_weight > 0:  # training-only head of the referent-patch loss; not part of the model bundle
        patch_head = torch.nn.Linear(spec.prompt_dim, 1).to(device)
        _broadcast_parameters(patch_head)
        groups.append({"params": list(patch_head.parameters()), "lr": cfg.lr, "name": "patch_head"})
        if cfg.patch_head_fit_steps > 0 and not cfg.resume:
            _fit_patch_head(model, patch_head, loader, tokenizer, device, cfg.patch_head_fit_steps, world)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.schedule not in ("step", "epoch", "time"):
        raise ValueError(f"schedule must be 'step', 'epoch' or 'time', got {cfg.schedule!r}")
    if cfg.schedule == "time" and not cfg.time_limit_min:
        raise ValueError("schedule='time' needs time_limit_min (the cosine runs over the wall-clock budget)")
    per_step = cfg.schedule == "step"
    horizon = total_steps if per_step else cfg.epochs
    warm = cfg.warmup_epochs * (steps_per_epoch if per_step else 1)
    if cfg.schedule == "time":  # t = fraction of the time budget spent; warm-up = the same fraction of epochs
        horizon, warm = 1.0, min(cfg.warmup_epochs / max(cfg.epochs, 1), 0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda t, base=grp["lr"]: lr_factor(t, horizon, warm, base, cfg.lr_min)) for grp in groups])

    # --- resume ------------------------------------------------------------------------------------------------------
    start_epoch, step, best, best_epoch, history = 0, 0, -1.0, None, []
    elapsed_before = 0.0  # wall time of the runs this one resumes (time budget and schedule="time")
    best_metrics: dict[str, float] = {}
    resume = cfg.resume
    if resume == "auto":
        resume = str(out_dir / "last.pt") if (out_dir / "last.pt").exists() else None
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if patch_head is not None and state.get("patch_head"):
            patch_head.load_state_dict(state["patch_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"], state["step"]
        elapsed_before = float(state.get("elapsed_s", 0.0))
        best, best_epoch = state["best"], state["best_epoch"]
        best_metrics, history = state.get("best_metrics", {}), state.get("history", [])
        rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng)
        if master:
            log.info("resumed from %s at epoch %d, step %d", resume, start_epoch, step)

    # --- logs --------------------------------------------------------------------------------------------------------
    step_log = _CsvLog(out_dir / "log.csv") if master and cfg.save_checkpoints else None
    if master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("training %s: %d samples, %d steps/epoch x %d epochs, batch %d x %d processes, %.2fM trainable "
                 "parameters, device %s", spec.name, len(view), steps_per_epoch, cfg.epochs, batch_size, world,
                 n_train / 1e6, device)

    # --- loop --------------------------------------------------------------------------------------------------------
    stop = False
    last_path = best_path = None
    sam_params = {id(p) for p in model.sam.parameters()}   # not run (no gradient) in box-only steps
    warming_up = cfg.ground_first_min > 0                   # grounding warm-up; once over (time only grows) it stays
    for epoch in range(start_epoch, cfg.epochs):
        if stop or (cfg.max_steps and step >= cfg.max_steps):
            break
        _set_decoder_trainable(model, epoch >= cfg.freeze_decoder_epochs and not cfg.box_only)
        trainable = [p for grp in groups for p in grp["params"] if p.requires_grad]
        view.epoch = epoch
        g.manual_seed(cfg.seed * 1000 + epoch)  # the shuffle of each epoch is a function of (seed, epoch): resumable
        for smp in (sampler, batch_sampler):
            if smp is not None:
                smp.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and master),
                   leave=False)
        for batch in bar:
            elapsed = elapsed_before + time.time() - t_start
            if cfg.schedule == "time":  # rank 0's clock decides, so every rank uses the same lr
                frac = _from_rank0(elapsed / (60 * cfg.time_limit_min))
                for grp, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
                    grp["lr"] = grp["initial_lr"] * lam(min(frac, 1.0))
            if warming_up:  # all ranks agree, so the all-reduce stops once the warm-up is over
                warming_up = _agree(elapsed < 60 * cfg.ground_first_min)
            box_only = cfg.box_only or warming_up
            out = _forward(model, batch, tokenizer, device, box_only=box_only)
            loss = ssp_sam_loss(out.logits, None if box_only else batch["mask"][:, None].to(device),
                                out.box, batch["box"].to(device), batch["valid"].to(device), box_only=box_only,
                                official_no_target_box=cfg.official_no_target_box)
            if cfg.grounding_loss_weight > 0 and "grid" in batch:
                aux = grounding_loss(out.similarity, batch["grid"].to(device), batch["valid"].to(device))
                loss.total = loss.total + cfg.grounding_loss_weight * aux
                loss.parts["grounding"] = float(aux.detach())
            if patch_head is not None and "grid" in batch:
                aux = referent_patch_loss(patch_head(out.visual_out)[..., 0], batch["grid"].to(device))
                loss.total = loss.total + cfg.patch_loss_weight * aux
                loss.parts["patch"] = float(aux.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            active = [p for p in trainable if id(p) not in sam_params] if box_only else trainable
            _average_gradients(active, world)
            if cfg.clip_grad and cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(active, cfg.clip_grad)
            optimizer.step()
            if per_step:
                scheduler.step()
            step += 1
            n_batches += 1
            for k, v in loss.parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if master and cfg.progress:
                bar.set_postfix(loss=f"{loss.parts['total']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if step_log is not None and step % cfg.log_every == 0:
                step_log.write({"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                "time_s": round(time.time() - t_start, 1), **loss.parts})
            if cfg.max_steps and step >= cfg.max_steps:
                break
            if cfg.time_limit_min:
                stop = _agree(elapsed_before + time.time() - t_start > 60 * cfg.time_limit_min)
                if stop:
                    break
        if cfg.schedule == "epoch":
            scheduler.step()
        record: dict[str, float] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                    "time_s": round(time.time() - t_start, 1),
                                    **{f"train/{k}": v / max(n_batches, 1) for k, v in sums.items()}}
        last_epoch = epoch + 1 >= cfg.epochs or stop or bool(cfg.max_steps and step >= cfg.max_steps)
        if val_set is not None and len(val_set) and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            metrics = evaluate_model(model, tokenizer, val_set, batch_size=cfg.eval_batch_size,
                                     max_samples=cfg.val_max_samples, embeddings=val_emb)
            record.update({f"val/{k}": v for k, v in metrics.items()})
            if metrics["mIoU"] > best:
                best, best_epoch, best_metrics = metrics["mIoU"], epoch + 1, metrics
                if master and cfg.save_checkpoints:
                    best_path = _save_best(model, tokenizer, out_dir / "best.pt", epoch + 1, metrics, cfg)
        history.append(record)
        if master:
            log.info("epoch %d: %s", epoch + 1, _short(record))
        if master and cfg.save_checkpoints:
            from ssp_sam.checkpoints import atomic_torch_save

            _CsvLog(out_dir / "epochs.csv").write(record)
            _plot_curves(out_dir)
        rngs = _gather_rng()
        if master and cfg.save_checkpoints:
            last_path = out_dir / "last.pt"
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                               "patch_head": patch_head.state_dict() if patch_head is not None else None,
                               "rng": rngs, "config": dataclasses.asdict(cfg), "spec": spec.to_dict(),
                               "best": best, "best_epoch": best_epoch, "best_metrics": best_metrics,
                               "history": history, "elapsed_s": elapsed_before + time.time() - t_start},
                              last_path)
        if on_epoch_end is not None and on_epoch_end(record):
            stop = True
    if best_path is None and master and cfg.save_checkpoints and val_set is None:
        best_path = _save_best(model, tokenizer, out_dir / "best.pt", len(history), {}, cfg)
    model.eval()
    return TrainResult(history=history, best_metrics=best_metrics, best_epoch=best_epoch, best_path=best_path,
                       last_path=last_path, steps=step, wall_time_s=time.time() - t_start, model=model)


def _fit_patch_head(model, head: torch.nn.Linear, loader, tokenizer, device: torch.device, steps: int,
                    world: int, max_samples: int = 2048) -> None:
    """Linear probe: fit the referent-patch head on the (frozen) start model's fused-token outputs of one pass over
    the training data (at most ``max_samples`` per process, which bounds memory), so the auxiliary loss does not
    start from a random head (whose large early gradients pull the prompt generator away from what it knew,
    "nothing here" first). Every process runs the same ``steps`` gradient all-reduces."""
    feats, targets, n = [], [], 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            feats.append(_forward(model, batch, tokenizer, device).visual_out.float())
            targets.append(batch["grid"].to(device))
            n += len(feats[-1])
            if n >= max_samples:
                break
    model.train(was_training)
    x = torch.cat(feats) if feats else torch.zeros(0, 1, head.in_features, device=device)
    y = torch.cat(targets) if targets else torch.zeros(0, 1, device=device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if len(x):  # a process without samples still takes part in the all-reduce (zero gradients)
            referent_patch_loss(head(x)[..., 0], y).backward()
        _average_gradients(list(head.parameters()), world)
        opt.step()
    if len(x):
        log.info("patch head fitted on %d samples (%d steps): loss %.4f", len(x), steps,
                 float(referent_patch_loss(head(x)[..., 0], y).detach()))


def _agree(flag: bool) -> bool:
    """All ranks stop together: True if any rank says so."""
    rank, world = _dist_info()
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _from_rank0(x: float) -> float:
    rank, world = _dist_info()
    if world <= 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def _gather_rng() -> list[dict[str, Any]]:
    rank, world = _dist_info()
    mine = _rng_state()
    if world <= 1:
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def _build_for_training(cfg: TrainConfig):
    from ssp_sam.build import ModelConfig, build_model, load_model
    from ssp_sam.tokenizer import load_tokenizer

    if cfg.init_checkpoint:
        loaded = load_model(ModelConfig(variant=cfg.variant, checkpoint=cfg.init_checkpoint, device="cpu"))
        return loaded.model, loaded.tokenizer
    model = build_model(cfg.variant, seed=cfg.seed)
    return model, load_tokenizer(model.spec)


def _save_best(model, tokenizer, path: Path, epoch: int, metrics: dict[str, float], cfg: TrainConfig) -> Path:
    from ssp_sam.checkpoints import save_bundle

    meta = {"epoch": epoch, "val": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in metrics.items()},
            "train_config": dataclasses.asdict(cfg)}
    return save_bundle(model, tokenizer, path, meta=meta)


def _short(record: dict[str, float]) -> str:
    keys = ["train/total", "val/mIoU", "val/oIoU", "val/N-acc", "val/Pr@0.50", "lr", "time_s"]
    return ", ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)


class _CsvLog:
    """Appends dict rows to a CSV file, widening the header when new keys appear."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        rows: list[dict[str, Any]] = []
        header: list[str] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = list(reader)
        new_keys = [k for k in row if k not in header]
        if new_keys:
            header += new_keys
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, header)
                w.writeheader()
                w.writerows(rows + [row])
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, header).writerow(row)


def _plot_curves(out_dir: Path) -> None:
    """Training loss (per logged step) and validation mIoU / N-acc (per epoch) -> curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(p: Path) -> list[dict[str, str]]:
        if not p.exists():
            return []
        with open(p, newline="") as f:
            return list(csv.DictReader(f))

    steps, epochs = read(out_dir / "log.csv"), read(out_dir / "epochs.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if steps:
        axes[0].plot([float(r["step"]) for r in steps], [float(r["total"]) for r in steps], label="total")
        for k in ("dice", "focal", "l1", "giou"):
            if k in steps[0] and steps[0][k]:
                axes[0].plot([float(r["step"]) for r in steps], [float(r[k] or "nan") for r in steps], label=k,
                             alpha=0.6)
        axes[0].set_xlabel("step"), axes[0].set_yscale("log"), axes[0].legend(fontsize=7)
        axes[0].set_title("training loss")
    for k in ("val/mIoU", "val/oIoU", "val/N-acc"):
        pts = [(float(r["epoch"]), float(r[k])) for r in epochs if r.get(k) not in (None, "", "nan")]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=k)
    axes[1].set_xlabel("epoch"), axes[1].set_ylim(0, 1), axes[1].legend(fontsize=7), axes[1].set_title("validation")
    fig.tight_layout()
    tmp = out_dir / ".curves.png.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_dir / "curves.png")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        ftype = str(f.type)
        if ftype == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        elif "bool" in ftype:  # bool | None
            p.add_argument(name, type=_parse_bool, default=None, metavar="{true,false}")
        elif "int" in ftype and "float" not in ftype:
            p.add_argument(name, type=int, default=None)
        elif "float" in ftype:
            p.add_argument(name, type=float, default=None)
        else:
            p.add_argument(name, default=None)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset values, then every option given on the command line."""
    base = dict(PRESETS[args.preset]) if args.preset else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    return TrainConfig(**base)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ssp-sam train``."""
    p = subparsers.add_parser("train", help="train or fine-tune SSP-SAM (torchrun for several processes)",
                              description="Train SSP-SAM. Options override the preset; see docs/training.md.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--bundle-out", default=None, help="also copy the best bundle here (e.g. ssp_sam/assets/...)")
    _add_config_arguments(p)
    p.set_defaults(func=_cli_train)


def _cli_train(args: argparse.Namespace) -> int:
    import shutil

    cfg = config_from_args(args)
    result = train(cfg)
    rank, _ = _dist_info()
    if rank == 0:
        print(f"done: {result.steps} steps in {result.wall_time_s / 60:.1f} min; best epoch {result.best_epoch}")
        if result.best_metrics:
            print(format_table(result.best_metrics))
        if args.bundle_out and result.best_path:
            shutil.copyfile(result.best_path, args.bundle_out)
            print(f"bundle copied to {args.bundle_out}")
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.out_dir) / "result.json", "w") as f:
            json.dump({"best_epoch": result.best_epoch, "steps": result.steps, "wall_time_s": result.wall_time_s,
                       "best_metrics": result.best_metrics}, f, indent=1, default=float)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


__all__ = ["TrainConfig", "TrainResult", "PRESETS", "config_from_preset", "train", "evaluate_model",
           "precompute_embeddings", "TrainView", "collate", "lr_factor", "param_groups", "register_cli"]
