"""Training loop for SSP-SAM, in the spirit of nanoGPT's ``train.py``: :func:`train` reads top to bottom as set-up,
one epoch, evaluation and checkpoint, each a short function below it.

Recipe (the official one; docs/training.md): loss 4 dice + 4 focal + 5 L1 + 2 GIoU (``ssp_sam.losses``); AdamW,
weight decay 1e-4; two parameter groups (new modules ``lr``, SAM mask decoder ``lr_decoder``); linear warm-up from
``lr_min`` then cosine to ``lr_min`` (``ssp_sam.schedule.WarmupCosine``, over steps, epochs or the wall-clock budget);
gradient clipping at global norm 0.1; mask decoder frozen for the first ``freeze_decoder_epochs`` epochs; seed
3407 + rank; CLIP and the SAM image encoder frozen unless the variant (the demo) or ``train_clip`` /
``train_sam_encoder`` says otherwise; random placement of the image in the padded CLIP square (box target shifted;
the SAM view and GT mask stay fixed, as official).

Several processes: ``torchrun --nproc_per_node=N -m backend.cli train ...`` (gloo on CPU, NCCL on CUDA). The model
and its training-only heads are wrapped together in ``DistributedDataParallel``; every run, one process included,
reads its batches through a ``DistributedSampler``, so N processes of batch b see the global batches one process of
batch N x b sees. Rank 0 logs and writes files.

Files in ``out_dir``: ``last.pt`` (full training state; resumes exactly: model, optimiser, scheduler, epoch, step, RNG
states, elapsed time, config), ``best.pt`` (a model bundle, best validation mIoU), ``log.csv`` (per logging step),
``epochs.csv`` (per-epoch metrics), ``curves.png`` (``ssp_sam.runlog``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ssp_sam.batches import TrainView, collate, forward_batch, precompute_embeddings
from ssp_sam.clicks import Click, click_round
from ssp_sam.data import Sample
from ssp_sam.distributed import from_rank0, gather_objects, init_distributed, rank_and_world
from ssp_sam.evaluate import evaluate_model
from ssp_sam.losses import LossOutput, mask_loss, referent_patch_loss, ssp_sam_loss
from ssp_sam.metrics import format_table
from ssp_sam.options import add_dataclass_arguments, opt, overrides_from_args
from ssp_sam.runlog import CsvLog, plot_curves
from ssp_sam.schedule import SCHEDULES, WarmupCosine, warmup_fraction

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run needs. Every field is also a ``ssp-sam train --field-name`` option."""

    # data (used when train_set / val_set are not passed to ``train``; see ssp_sam.data.datasets.load_dataset)
    train_data: str = opt("synthetic:2000", "training data: synthetic:N[:seed=S][:domain=D] | file.jsonl | "
                                            "official:ROOT:DATASET:SPLIT")
    val_data: str = opt("synthetic:200:seed=1", "validation data, same forms; empty: no validation")
    # model
    variant: str = opt("demo", "model variant (ssp_sam/build.py)")
    init_checkpoint: str | None = opt(None, "weights to start from (a bundle or an official .pth)")
    train_clip: bool | None = opt(None, "train CLIP (default: what the variant says; only demo and tiny do)")
    train_sam_encoder: bool | None = opt(None, "train the SAM image encoder (default: what the variant says)")
    # optimisation
    epochs: int = opt(10, "passes over the training data")
    batch_size: int = opt(8, "samples per optimiser step and process")
    lr: float = opt(1e-4, "learning rate of the new modules (SSP encoder, prompt generator, box head) and of CLIP / "
                          "the SAM encoder when they train")
    lr_decoder: float = opt(1e-5, "learning rate of the SAM mask decoder")
    lr_min: float = opt(1e-6, "learning rate at the start of the warm-up and at the end of the cosine")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    warmup_epochs: float = opt(5.0, "linear warm-up length in epochs (schedule 'time': the same share of the budget, "
                                    "at most half)")
    schedule: str = opt("step", "what the cosine runs over: 'step' (optimiser steps), 'epoch' (constant within an "
                                "epoch, the official timm scheduler) or 'time' (the budget time_limit_min)")
    clip_grad: float = opt(0.1, "gradient clipping at this global norm (0: off)")
    freeze_decoder_epochs: int = opt(20, "keep the mask decoder frozen for this many epochs")
    box_only: bool = opt(False, "REC pre-training: box losses only, SAM is not run")
    ground_first_min: float = opt(0.0, "grounding warm-up: the first minutes of wall time are box-only steps (SAM not "
                                       "run, ~3x cheaper; box and auxiliary losses train the rest); 0: off")
    aug_translate: bool = opt(True, "place the image at a random spot of the padded CLIP square (official)")
    seed: int = opt(3407, "random seed (process r uses seed + r)")
    max_steps: int | None = opt(None, "stop after this many optimiser steps (tests, smoke runs)")
    time_limit_min: float | None = opt(None, "stop (then evaluate and save) after this many minutes of wall time")
    # evaluation and output
    out_dir: str = opt("runs/train", "where last.pt, best.pt, the logs and curves.png go")
    eval_every: int = opt(1, "validate every this many epochs (and after the last one)")
    eval_batch_size: int = opt(16, "validation batch size")
    val_max_samples: int | None = opt(None, "validate on at most this many samples")
    save_checkpoints: bool = opt(True, "write last.pt, best.pt and the logs")
    resume: str | None = opt(None, "a last.pt to continue from ('auto': out_dir/last.pt if present)")
    embeddings_dir: str | None = opt(None, "cached SAM embeddings (ssp-sam embed), read when the encoder is frozen")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = opt(0, "DataLoader worker processes")
    log_every: int = opt(25, "write a log.csv row every this many steps")
    progress: bool = opt(True, "show progress bars")
    threads: int | None = opt(None, "torch.set_num_threads for CPU runs")
    token_init_std: float | None = opt(None, "re-initialise the prompt generator's position/REG/prompt tables with "
                                             "this std before training (from-scratch runs; official: N(0, 1))")
    patch_loss_weight: float = opt(0.0, "weight of the auxiliary referent-patch loss (ssp_sam.losses) through a "
                                        "training-only linear head; 0: off (official)")
    click_sim: bool = opt(False, "also train with simulated clicks (SAM's recipe of interleaved click rounds, "
                                 "ssp_sam.clicks): after each sentence step, a chain of up to click_rounds clicks, "
                                 "each at the largest error of the previous mask; SAM's prompt encoder trains too")
    click_rounds: int = opt(4, "longest click chain per step (its length is drawn from 1..click_rounds)")
    click_only_prob: float = opt(0.3, "share of chains without the sentence (plain SAM clicks)")
    click_mask_prob: float = opt(0.5, "share of chains that also feed the previous mask as SAM's dense prompt")
    patch_head_fit_steps: int = opt(0, "fit that head alone on the start model's outputs first, for this many steps "
                                       "(a linear probe; for runs that start from a bundle, which has no head)")


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
    # One round of `ssp-sam finetune` (backend/learning/finetune.py) on annotators' corrections: a short, gentle
    # update of a trained model (same lr for the decoder, no warm-up, no freeze), no files. The caller gives the
    # variant, the data (samples, no validation set) and the patch-loss weight the variant was trained with.
    "finetune": dict(epochs=10, batch_size=8, lr=1e-4, lr_decoder=1e-4, lr_min=1e-6, warmup_epochs=0.0,
                     freeze_decoder_epochs=0, clip_grad=1.0, aug_translate=True, patch_head_fit_steps=200,
                     seed=3407, eval_batch_size=16, save_checkpoints=False, progress=False, log_every=10 ** 9),
    # Click training of the packaged demo (docs/training.md, "Clicks"): from the demo bundle, its encoders frozen,
    # the demo's sentence objective (its referent-patch loss included, the head first fitted as a probe) on every
    # step plus one simulated click chain; SAM's prompt encoder (random in the demo) and the decoder at the higher
    # lr, the sentence path gently; a budget in steps (4 epochs of 750), not minutes, so a shared machine changes
    # only how long it takes. `python bench/train_demo.py --preset demo-clicks`.
    "demo-clicks": dict(variant="demo", train_data="synthetic:12000:seed=0", val_data="synthetic:300:seed=1",
                        train_clip=False, train_sam_encoder=False, click_sim=True, click_rounds=6, epochs=4,
                        batch_size=16, lr=3e-5, lr_decoder=1e-3, lr_min=1e-6, warmup_epochs=0.05, schedule="step",
                        freeze_decoder_epochs=0, clip_grad=1.0, aug_translate=False,
                        patch_loss_weight=20.0, patch_head_fit_steps=200,
                        out_dir="runs/demo-clicks", eval_batch_size=32, log_every=50, threads=2),
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
    run = setup_run(cfg)
    model, tokenizer = prepare_model(cfg, run.device, model, tokenizer)
    train_set, val_set = load_data(cfg, train_set, val_set, run.master)
    train_emb, run.val_emb = embeddings_for(cfg, model, train_set, val_set, run.device, run.master)
    run.view, run.sampler, run.loader = make_loader(cfg, model.spec, train_set, train_emb, run.rank, run.world)
    run.objective = Objective(model, tokenizer, run.device, cfg.patch_loss_weight,
                              ClickChains.from_config(cfg) if cfg.click_sim else None)
    run.optimizer, run.scheduler = make_optimizer(cfg, run.objective, len(run.loader))
    resumed = resume(cfg, run)
    wrap_for_epoch(run, run.start_epoch)                # building DDP gives every rank rank 0's weights
    if run.objective.patch_head is not None and cfg.patch_head_fit_steps > 0 and not resumed:
        fit_patch_head(model, run.objective.patch_head, run.loader, tokenizer, run.device, cfg.patch_head_fit_steps)
    start_training(cfg, run, len(train_set))
    for epoch in range(run.start_epoch, cfg.epochs):
        if run.stop:
            break
        record = run_epoch(run, epoch)
        record.update(evaluate_epoch(run, val_set, epoch))
        run.history.append(record)
        save_checkpoint(run, epoch, record)
        if on_epoch_end is not None and on_epoch_end(record):
            run.stop = True
    return finish(run, val_set)


# ----------------------------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Run:
    """The state of one training run, as the loop's functions share it."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    t_start: float                                    # this process's start (time.time())
    elapsed_before: float = 0.0                       # wall time of the runs this one resumes
    view: TrainView | None = None
    sampler: DistributedSampler | None = None
    loader: DataLoader | None = None
    val_emb: Any = None
    objective: "Objective | None" = None
    ddp: torch.nn.Module | None = None               # the objective, wrapped in DDP when world > 1
    wrapped_for: bool | None = None                   # the decoder-trainable state the wrapper was built for
    optimizer: torch.optim.Optimizer | None = None
    scheduler: WarmupCosine | None = None
    start_epoch: int = 0
    step: int = 0
    warming_up: bool = False                          # grounding warm-up (box-only steps) still on
    stop: bool = False
    best: float = -1.0
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None
    step_log: CsvLog | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def writes_files(self) -> bool:
        return self.master and self.cfg.save_checkpoints

    def elapsed(self) -> float:
        """Seconds of wall time this run and the runs it resumes have spent, by rank 0's clock (every rank agrees)."""
        return from_rank0(self.elapsed_before + time.time() - self.t_start)


def setup_run(cfg: TrainConfig) -> Run:
    """Check the config, join the process group, seed every generator (seed + rank), create ``out_dir``."""
    from ssp_sam.build import resolve_device

    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule == "time" and not cfg.time_limit_min:
        raise ValueError("schedule='time' needs time_limit_min (the cosine runs over the wall-clock budget)")
    t_start = time.time()
    rank, world, device = init_distributed(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    run = Run(cfg=cfg, rank=rank, world=world, device=device, out_dir=Path(cfg.out_dir), t_start=t_start)
    if run.writes_files:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    return run


def prepare_model(cfg: TrainConfig, device: torch.device, model=None, tokenizer=None):
    """The model (built or loaded when None) with the config's spec overrides and what the spec trains marked
    trainable, on ``device``; and its tokenizer."""
    from ssp_sam.build import ModelConfig, build_model, load_model, set_trainable
    from ssp_sam.tokenizer import load_tokenizer

    if model is None and cfg.init_checkpoint:
        loaded = load_model(ModelConfig(variant=cfg.variant, checkpoint=cfg.init_checkpoint, device="cpu"))
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    elif model is None:
        model = build_model(cfg.variant, seed=cfg.seed)
    tokenizer = tokenizer or load_tokenizer(model.spec)
    overrides = {k: v for k, v in (("train_clip", cfg.train_clip), ("train_sam_encoder", cfg.train_sam_encoder))
                 if v is not None}
    if overrides:
        model.spec = dataclasses.replace(model.spec, **overrides)
    if cfg.token_init_std and not cfg.resume:
        model.prompt_generator.init_token_tables(cfg.token_init_std)
    set_trainable(model, train_mask_decoder=True,   # the model's own rules (e.g. unused decoder heads stay off)
                  train_prompt_encoder=cfg.click_sim)
    return model.to(device), tokenizer


def load_data(cfg: TrainConfig, train_set, val_set, master: bool):
    """The training and validation samples: the ones given, else those ``cfg.train_data`` / ``cfg.val_data`` name."""
    from ssp_sam.data.datasets import load_dataset

    if train_set is None:
        train_set = load_dataset(cfg.train_data, train=True, progress=cfg.progress and master)
    if val_set is None and cfg.val_data:
        val_set = load_dataset(cfg.val_data, train=False, progress=False)
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    return train_set, val_set


def embeddings_for(cfg: TrainConfig, model, train_set, val_set, device: torch.device, master: bool):
    """SAM embeddings (train, val) for a frozen SAM encoder, so it never runs per step: read from
    ``cfg.embeddings_dir`` (``ssp-sam embed``), else computed once in memory. (None, None) when the encoder trains
    or SAM is not run at all (``box_only``)."""
    spec = model.spec
    if spec.train_sam_encoder or cfg.box_only:
        return None, None
    if cfg.embeddings_dir:
        from ssp_sam.embed import EmbeddingStore

        stores = {"train": EmbeddingStore(cfg.embeddings_dir, train_set),
                  "val": EmbeddingStore(cfg.embeddings_dir, val_set) if val_set is not None else None}
        for name, store in stores.items():
            missing = store.missing() if store is not None else []
            if missing:
                raise FileNotFoundError(f"{len(missing)} {name} images have no embedding in {cfg.embeddings_dir}; "
                                        f"run `ssp-sam embed --data ... --out {cfg.embeddings_dir}` first")
        return stores["train"], stores["val"]
    if model.sam.image_encoder is None:
        return None, None
    train_emb = precompute_embeddings(model, train_set, spec, device=device, progress=cfg.progress and master)
    val_emb = precompute_embeddings(model, val_set, spec, device=device) if val_set is not None else None
    return train_emb, val_emb


def make_loader(cfg: TrainConfig, spec, train_set, embeddings, rank: int, world: int):
    """The training view, its ``DistributedSampler`` (also for one process: the global batches of N processes of
    batch b are those of one process of batch N x b) and the DataLoader (full batches only)."""
    view = TrainView(train_set, spec, augment=cfg.aug_translate, seed=cfg.seed, embeddings=embeddings,
                     clip_grid=cfg.patch_loss_weight > 0)
    sampler = DistributedSampler(view, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    batch_size = min(cfg.batch_size, max(1, len(view) // world))
    loader = DataLoader(view, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
                        num_workers=cfg.num_workers)
    if len(loader) == 0:
        raise ValueError(f"{len(view)} training samples are too few for {world} processes")
    return view, sampler, loader


@dataclass
class ClickChains:
    """Click training (``--click-sim``): how the chains after each sentence step are drawn."""

    rounds: int = 4
    only_prob: float = 0.3
    mask_prob: float = 0.5
    jitter: float = 0.7          # the click lands among the points at least this x the deepest error's depth

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ClickChains":
        return cls(max(1, cfg.click_rounds), cfg.click_only_prob, cfg.click_mask_prob)


class Objective(torch.nn.Module):
    """The model, its training-only heads and the loss, as one module: what ``DistributedDataParallel`` wraps
    (DDP averages the gradients of every parameter used in ``forward``).

    ``forward(batch, box_only)`` returns the :class:`~ssp_sam.losses.LossOutput` of one batch: the official loss,
    plus ``patch_loss_weight`` x the referent-patch loss of a linear head on the prompt generator's fused-token
    outputs when that weight is > 0. The head is saved in ``last.pt`` but never in a bundle. ``parts["total"]``
    stays the official loss (what the logs have always shown); ``parts["patch"]`` is the auxiliary one. With
    ``clicks``, the mask loss of one simulated click chain is added (``parts["clicks"]``).
    """

    def __init__(self, model, tokenizer, device: torch.device, patch_loss_weight: float = 0.0,
                 clicks: ClickChains | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.patch_loss_weight = patch_loss_weight
        self.patch_head = (torch.nn.Linear(model.spec.prompt_dim, 1).to(device) if patch_loss_weight > 0 else None)
        self.clicks = clicks

    def forward(self, batch: dict[str, Any], box_only: bool = False) -> LossOutput:
        dev = self.device
        out = forward_batch(self.model, batch, self.tokenizer, dev, box_only=box_only)
        loss = ssp_sam_loss(out.logits, None if box_only else batch["mask"][:, None].to(dev), out.box,
                            batch["box"].to(dev), batch["valid"].to(dev), box_only=box_only)
        if self.patch_head is not None:
            aux = referent_patch_loss(self.patch_head(out.visual_out)[..., 0], batch["grid"].to(dev))
            loss.total = loss.total + self.patch_loss_weight * aux
            loss.parts["patch"] = float(aux.detach())
        if self.clicks is not None and not box_only:
            chain = self.click_chain_loss(out, batch["mask"])
            loss.total = loss.total + chain
            loss.parts["clicks"] = float(chain.detach())
        return loss

    def click_chain_loss(self, out, masks: torch.Tensor) -> torch.Tensor:
        """One simulated interactive session per sample, as SAM trains its prompts: the sentence's mask (or, in
        ``only_prob`` of the chains, nothing: plain SAM clicks), then ``n`` clicks, each at the largest error of the
        previous mask, optionally with that mask's logits (detached) as the dense prompt. Returns the mean mask loss
        over the ``n`` rounds."""
        cfg, model, dev = self.clicks, self.model, self.device
        gt = masks.bool().numpy()
        target = masks[:, None].to(dev)
        clicks_only = random.random() < cfg.only_prob
        use_mask = random.random() < cfg.mask_prob
        prompts = None if clicks_only else out.prompts
        prev = np.zeros_like(gt) if clicks_only else (out.logits[:, 0].detach() > 0).cpu().numpy()
        low = None if clicks_only else out.low_res_logits.detach()
        chains: list[list[Click]] = [[] for _ in range(len(gt))]
        n = random.randint(1, cfg.rounds)
        total = 0.0
        for _ in range(n):
            logits, low = click_round(model, out.image_embeddings, prompts, chains, prev, gt,
                                      low if use_mask else None, random, cfg.jitter)
            total = total + mask_loss(logits, target)
            prev = (logits[:, 0].detach() > 0).cpu().numpy()
        return total / n


def param_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: the SAM mask decoder and prompt encoder (``lr_decoder``) and every other trainable parameter
    (``lr``). The decoder group holds its parameters even while they are frozen (AdamW skips parameters without a
    grad); the prompt encoder trains only with ``click_sim``."""
    decoder = list(model.sam.mask_decoder.parameters()) + list(model.sam.prompt_encoder.parameters())
    decoder_ids = {id(p) for p in decoder}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in decoder_ids]
    return [{"params": others, "lr": cfg.lr, "name": "main"},
            {"params": decoder, "lr": cfg.lr_decoder, "name": "mask_decoder"}]


def make_optimizer(cfg: TrainConfig, objective: Objective, steps_per_epoch: int):
    """AdamW over the parameter groups (plus the patch head, at ``lr``) and its warm-up + cosine schedule."""
    groups = param_groups(objective.model, cfg)
    if objective.patch_head is not None:
        groups.append({"params": list(objective.patch_head.parameters()), "lr": cfg.lr, "name": "patch_head"})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total = total_steps(cfg, steps_per_epoch)
    warmup = warmup_fraction(cfg.schedule, cfg.warmup_epochs, cfg.epochs, steps_per_epoch, total)
    return optimizer, WarmupCosine(optimizer, warmup=warmup, lr_min=cfg.lr_min)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = cfg.epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def resume(cfg: TrainConfig, run: Run) -> bool:
    """Continue from ``cfg.resume`` (``"auto"``: ``out_dir/last.pt`` if it exists): model, patch head, optimiser,
    scheduler, epoch, step, best so far, history, elapsed time and this rank's RNG states. False for a fresh run."""
    path = cfg.resume
    if path == "auto":
        path = str(run.out_dir / "last.pt") if (run.out_dir / "last.pt").exists() else None
    if path:
        state = torch.load(path, map_location="cpu", weights_only=False)
        run.objective.model.load_state_dict(state["model"])
        if run.objective.patch_head is not None and state.get("patch_head"):
            run.objective.patch_head.load_state_dict(state["patch_head"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.step = state["epoch"], state["step"]
        run.elapsed_before = float(state.get("elapsed_s", 0.0))
        run.best, run.best_epoch = state["best"], state["best_epoch"]
        run.best_metrics, run.history = state.get("best_metrics", {}), state.get("history", [])
        _set_rng_state(state["rng"][run.rank] if run.rank < len(state["rng"]) else state["rng"][0])
        if run.master:
            log.info("resumed from %s at epoch %d, step %d", path, run.start_epoch, run.step)
    return bool(path)


def wrap_for_epoch(run: Run, epoch: int) -> None:
    """Freeze or unfreeze the mask decoder for ``epoch`` and, with several processes, wrap the objective in DDP for
    the parameters that train now: DDP registers them when it is built, so it is rebuilt when the set changes.

    ``find_unused_parameters``: box-only steps (the grounding warm-up, ``box_only``) do not run SAM, and CLIP's
    ``logit_scale`` never takes part in the forward; DDP then leaves those gradients unset on every rank (AdamW
    skips them), as a one-process run does. Building the wrapper copies rank 0's parameters and buffers to every
    rank; ``forward_sync_buffers=False``: the model's buffers are constants, no need to copy them again each step."""
    from ssp_sam.build import set_trainable

    decoder_on = epoch >= run.cfg.freeze_decoder_epochs and not run.cfg.box_only
    if run.wrapped_for == decoder_on:
        return
    set_trainable(run.objective.model, train_mask_decoder=decoder_on, train_prompt_encoder=run.cfg.click_sim)
    run.ddp = run.objective
    if run.world > 1:
        run.ddp = None  # drop the previous wrapper (and its gradient hooks) before building the next one
        run.ddp = DistributedDataParallel(run.objective, device_ids=_device_ids(run.device),
                                          forward_sync_buffers=False, find_unused_parameters=True)
    run.wrapped_for = decoder_on


def _device_ids(device: torch.device) -> list[int] | None:
    return [device.index] if device.type == "cuda" else None


def fit_patch_head(model, head: torch.nn.Linear, loader, tokenizer, device: torch.device, steps: int,
                   max_samples: int = 2048) -> None:
    """Linear probe: fit the referent-patch head on the (frozen) start model's fused-token outputs of one pass over
    the training data (at most ``max_samples`` per process, which bounds memory), so the auxiliary loss does not
    start from a random head (whose large early gradients pull the prompt generator away from what it knew,
    "nothing here" first). Every process takes the same ``steps``, its gradients averaged by DDP; the ranks hold
    equal shares of samples (``DistributedSampler``), so that is the gradient of the mean over all of them."""
    feats, targets, n = [], [], 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            feats.append(forward_batch(model, batch, tokenizer, device).visual_out.float())
            targets.append(batch["grid"].to(device))
            n += len(feats[-1])
            if n >= max_samples:
                break
    model.train(was_training)
    x, y = torch.cat(feats), torch.cat(targets)
    _, world = rank_and_world()
    probe = DistributedDataParallel(head, device_ids=_device_ids(device)) if world > 1 else head
    opt_ = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt_.zero_grad(set_to_none=True)
        referent_patch_loss(probe(x)[..., 0], y).backward()
        opt_.step()
    del probe  # its hooks are inert after its last backward; the training wrapper holds the head too
    log.info("patch head fitted on %d samples (%d steps): loss %.4f", len(x), steps,
             float(referent_patch_loss(head(x)[..., 0], y).detach()))


def start_training(cfg: TrainConfig, run: Run, n_samples: int) -> None:
    """Whether the first step is a grounding warm-up step or there is nothing left to do (``max_steps`` reached);
    open the step log; log the plan."""
    run.warming_up = cfg.ground_first_min > 0 and run.elapsed() < 60 * cfg.ground_first_min
    run.stop = bool(cfg.max_steps and run.step >= cfg.max_steps)
    run.step_log = CsvLog(run.out_dir / "log.csv") if run.writes_files else None
    if run.master:
        model = run.objective.model
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("training %s: %d samples, %d steps/epoch x %d epochs, batch %d x %d processes, %.2fM trainable "
                 "parameters, device %s", model.spec.name, n_samples, len(run.loader), cfg.epochs,
                 run.loader.batch_size, run.world, n_train / 1e6, run.device)


# ----------------------------------------------------------------------------------------------------------------------
# One epoch


def run_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train one epoch (or until ``max_steps`` / the time limit); returns the epoch's record (mean loss parts, lr)."""
    from tqdm import tqdm

    cfg = run.cfg
    wrap_for_epoch(run, epoch)
    run.view.epoch = epoch                  # the CLIP placement of every sample is a function of (seed, epoch, index)
    run.sampler.set_epoch(epoch)            # and so is the shuffle: a resumed run continues exactly
    run.objective.train()
    sums: dict[str, float] = {}
    n_batches = 0
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and run.master),
               leave=False)
    for batch in bar:
        parts = train_step(run, batch)
        n_batches += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        after_step(run, epoch, parts, bar)
        if run.stop:
            break
    return {"epoch": epoch + 1, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
            "time_s": round(time.time() - run.t_start, 1),
            **{f"train/{k}": v / max(n_batches, 1) for k, v in sums.items()}}


def train_step(run: Run, batch: dict[str, Any]) -> dict[str, float]:
    """Forward, backward (DDP averages the gradients), clip, optimiser step. Returns the loss parts."""
    loss = run.ddp(batch, box_only=run.cfg.box_only or run.warming_up)
    run.optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    if run.cfg.clip_grad and run.cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.objective.parameters() if p.grad is not None],
                                       run.cfg.clip_grad)
    run.optimizer.step()
    run.step += 1
    return loss.parts


def after_step(run: Run, epoch: int, parts: dict[str, float], bar) -> None:
    """The lr of the next step, the end of the grounding warm-up, logging, and whether to stop (``max_steps``, the
    time limit). Time-based decisions use rank 0's clock, so every rank takes them together."""
    cfg = run.cfg
    elapsed = run.elapsed()
    run.scheduler.step(schedule_progress(cfg, run.step, len(run.loader), elapsed))
    run.warming_up = run.warming_up and elapsed < 60 * cfg.ground_first_min
    lr = run.optimizer.param_groups[0]["lr"]
    if run.master and cfg.progress:
        bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{lr:.2e}")
    if run.step_log is not None and run.step % cfg.log_every == 0:
        run.step_log.write({"epoch": epoch, "step": run.step, "lr": lr,
                            "time_s": round(time.time() - run.t_start, 1), **parts})
    if cfg.max_steps and run.step >= cfg.max_steps:
        run.stop = True
    if cfg.time_limit_min and elapsed > 60 * cfg.time_limit_min:
        run.stop = True


def schedule_progress(cfg: TrainConfig, step: int, steps_per_epoch: int, elapsed_s: float) -> float:
    """How far training is, in [0, 1], as ``cfg.schedule`` measures it: steps taken / total steps, epochs completed
    / epochs (so the lr changes at epoch boundaries only), or the share of the time budget spent."""
    if cfg.schedule == "step":
        return step / total_steps(cfg, steps_per_epoch)
    if cfg.schedule == "epoch":
        return (step // steps_per_epoch) / cfg.epochs
    return elapsed_s / (60 * cfg.time_limit_min)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and checkpoints


def evaluate_epoch(run: Run, val_set, epoch: int) -> dict[str, float]:
    """Validation metrics (``val/<key>``) every ``eval_every`` epochs and after the last one; a better mIoU than
    before is written as ``best.pt``. Every rank evaluates its share."""
    cfg = run.cfg
    last = epoch + 1 >= cfg.epochs or run.stop
    if val_set is None or not len(val_set) or ((epoch + 1) % cfg.eval_every != 0 and not last):
        return {}
    model = run.objective.model
    metrics = evaluate_model(model, run.objective.tokenizer, val_set, batch_size=cfg.eval_batch_size,
                             max_samples=cfg.val_max_samples, embeddings=run.val_emb)
    if metrics["mIoU"] > run.best:
        run.best, run.best_epoch, run.best_metrics = metrics["mIoU"], epoch + 1, metrics
        if run.writes_files:
            run.best_path = save_best(run, epoch + 1, metrics)
    return {f"val/{k}": v for k, v in metrics.items()}


def save_best(run: Run, epoch: int, metrics: dict[str, float]) -> Path:
    """The model as a bundle, ``out_dir/best.pt`` (the patch head stays out)."""
    from ssp_sam.checkpoints import save_bundle

    meta = {"epoch": epoch, "val": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in metrics.items()},
            "train_config": dataclasses.asdict(run.cfg)}
    model = run.objective.model
    return save_bundle(model, run.objective.tokenizer, run.out_dir / "best.pt", meta=meta, spec=bundle_spec(model.spec))


def bundle_spec(spec):
    """The spec a bundle records: the run's ``train_clip`` / ``train_sam_encoder`` overrides (in ``meta.train_config``)
    give way to the variant's own, so that what trains later (``ssp-sam finetune`` rounds) is the variant's recipe,
    not one run's choice (the demo's click stage freezes CLIP; its rounds must still learn new words)."""
    from ssp_sam.build import VARIANTS

    base = VARIANTS.get(spec.name)
    if base is None:
        return spec
    return dataclasses.replace(spec, train_clip=base.train_clip, train_sam_encoder=base.train_sam_encoder)


def save_checkpoint(run: Run, epoch: int, record: dict[str, float]) -> None:
    """``epochs.csv``, ``curves.png`` and ``last.pt`` (everything ``resume`` needs, the RNG states of every rank
    included), written by rank 0; every rank takes part in gathering the RNG states."""
    from ssp_sam.checkpoints import atomic_torch_save

    if run.master:
        log.info("epoch %d: %s", epoch + 1, _short(record))
    rngs = gather_objects(_rng_state())
    if not run.writes_files:
        return
    CsvLog(run.out_dir / "epochs.csv").write(record)
    plot_curves(run.out_dir)
    head = run.objective.patch_head
    run.last_path = run.out_dir / "last.pt"
    atomic_torch_save({"model": run.objective.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                       "scheduler": run.scheduler.state_dict(), "epoch": epoch + 1, "step": run.step,
                       "patch_head": head.state_dict() if head is not None else None, "rng": rngs,
                       "config": dataclasses.asdict(run.cfg), "spec": run.objective.model.spec.to_dict(),
                       "best": run.best, "best_epoch": run.best_epoch, "best_metrics": run.best_metrics,
                       "history": run.history, "elapsed_s": run.elapsed_before + time.time() - run.t_start},
                      run.last_path)


def finish(run: Run, val_set) -> TrainResult:
    """The result; without a validation set the final model is the ``best.pt`` bundle."""
    if run.best_path is None and run.writes_files and val_set is None:
        run.best_path = save_best(run, len(run.history), {})
    model = run.objective.model.eval()
    return TrainResult(history=run.history, best_metrics=run.best_metrics, best_epoch=run.best_epoch,
                       best_path=run.best_path, last_path=run.last_path, steps=run.step,
                       wall_time_s=time.time() - run.t_start, model=model)


def _short(record: dict[str, float]) -> str:
    keys = ["train/total", "val/mIoU", "val/oIoU", "val/N-acc", "val/Pr@0.50", "lr", "time_s"]
    return ", ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)


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
# CLI


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset values, then every option given on the command line."""
    base = dict(PRESETS[args.preset]) if args.preset else {}
    return TrainConfig(**{**base, **overrides_from_args(TrainConfig, args)})


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ssp-sam train``."""
    p = subparsers.add_parser("train", help="train or fine-tune SSP-SAM (torchrun for several processes)",
                              description="Train SSP-SAM. Options override the preset; see docs/training.md.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--bundle-out", default=None, help="also copy the best bundle here (e.g. ssp_sam/assets/...)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_cli_train)


def _cli_train(args: argparse.Namespace) -> int:
    from ssp_sam.io import write_bytes_atomic, write_text_atomic

    cfg = config_from_args(args)
    result = train(cfg)
    rank, _ = rank_and_world()
    if rank == 0:
        print(f"done: {result.steps} steps in {result.wall_time_s / 60:.1f} min; best epoch {result.best_epoch}")
        if result.best_metrics:
            print(format_table(result.best_metrics))
        if args.bundle_out and result.best_path:
            write_bytes_atomic(args.bundle_out, Path(result.best_path).read_bytes())
            print(f"bundle copied to {args.bundle_out}")
        write_text_atomic(Path(cfg.out_dir) / "result.json",
                          json.dumps({"best_epoch": result.best_epoch, "steps": result.steps,
                                      "wall_time_s": result.wall_time_s, "best_metrics": result.best_metrics},
                                     indent=1, default=float))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


__all__ = ["TrainConfig", "TrainResult", "PRESETS", "config_from_preset", "config_from_args", "train", "Objective",
           "param_groups", "fit_patch_head", "schedule_progress", "register_cli"]
