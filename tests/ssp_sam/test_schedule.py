"""The warm-up + cosine LRScheduler reproduces the hand-set learning rates of the previous loop, for each schedule,
and resumes exactly from its state_dict."""

import math

import pytest
import torch

from ssp_sam.schedule import WarmupCosine, warmup_fraction
from ssp_sam.train import TrainConfig, schedule_progress, total_steps


def lr_factor(t: float, total: float, warmup: float, base: float, lr_min: float) -> float:
    """The previous loop's multiplier (a LambdaLR per group, or set by hand per step for schedule 'time'), kept here
    as the reference: linear warm-up from lr_min over ``warmup``, then cosine to lr_min at ``total``."""
    floor = min(lr_min / base, 1.0) if base > 0 else 0.0
    if warmup > 0 and t < warmup:
        return floor + (1 - floor) * t / warmup
    span = max(total - warmup, 1e-9)
    progress = min(max((t - warmup) / span, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


BASES = (4e-4, 1e-5, 5e-7, 0.0)  # the last two: a base below lr_min stays constant, a zero base stays zero
LR_MIN = 1e-6


def _scheduler(cfg: TrainConfig, steps_per_epoch: int):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASES]
    opt = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, BASES)])
    total = total_steps(cfg, steps_per_epoch)
    warm = warmup_fraction(cfg.schedule, cfg.warmup_epochs, cfg.epochs, steps_per_epoch, total)
    return opt, WarmupCosine(opt, warmup=warm, lr_min=cfg.lr_min)


def _lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("warmup_epochs,max_steps", [(1.5, None), (0.0, None), (2.0, 17), (9.0, None)])
def test_step_schedule_matches_the_previous_per_step_lambda(warmup_epochs, max_steps):
    cfg = TrainConfig(schedule="step", epochs=6, warmup_epochs=warmup_epochs, lr_min=LR_MIN, max_steps=max_steps)
    spe = 7
    opt, sched = _scheduler(cfg, spe)
    total = total_steps(cfg, spe)
    for step in range(total + 1):  # the lr of the step that follows `step` optimiser steps
        want = [b * lr_factor(step, total, warmup_epochs * spe, b, LR_MIN) for b in BASES]
        assert _lrs(opt) == pytest.approx(want, rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step(schedule_progress(cfg, step + 1, spe, 0.0))


def test_epoch_schedule_matches_the_previous_per_epoch_lambda():
    cfg = TrainConfig(schedule="epoch", epochs=8, warmup_epochs=3, lr_min=LR_MIN)
    spe = 5
    opt, sched = _scheduler(cfg, spe)
    seen = set()
    for step in range(cfg.epochs * spe):
        epoch = step // spe  # constant within an epoch, like the official timm scheduler
        want = [b * lr_factor(epoch, cfg.epochs, cfg.warmup_epochs, b, LR_MIN) for b in BASES]
        assert _lrs(opt) == pytest.approx(want, rel=1e-9, abs=1e-15), step
        seen.add(tuple(_lrs(opt)))
        opt.step()
        sched.step(schedule_progress(cfg, step + 1, spe, 0.0))
    assert len(seen) == cfg.epochs


def test_time_schedule_matches_the_previous_wall_clock_lambda():
    cfg = TrainConfig(schedule="time", epochs=8, warmup_epochs=0.2, time_limit_min=24.0, lr_min=LR_MIN)
    opt, sched = _scheduler(cfg, 100)
    warm = min(cfg.warmup_epochs / cfg.epochs, 0.5)
    for elapsed_s in (0.0, 10.0, 36.0, 100.0, 600.0, 1439.0, 1440.0, 1500.0):
        opt.step()
        sched.step(schedule_progress(cfg, 1, 100, elapsed_s))
        frac = min(elapsed_s / (60 * cfg.time_limit_min), 1.0)
        want = [b * lr_factor(frac, 1.0, warm, b, LR_MIN) for b in BASES]
        assert _lrs(opt) == pytest.approx(want, rel=1e-9, abs=1e-15), elapsed_s


def test_state_dict_round_trip_resumes_the_curve():
    cfg = TrainConfig(schedule="step", epochs=4, warmup_epochs=1, lr_min=LR_MIN)
    spe = 6
    opt, sched = _scheduler(cfg, spe)
    for step in range(1, 10):
        opt.step()
        sched.step(schedule_progress(cfg, step, spe, 0.0))
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    opt2, sched2 = _scheduler(cfg, spe)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    assert _lrs(opt2) == _lrs(opt) and sched2.progress == sched.progress == 9 / 24
    for step in range(10, 25):  # both continue identically
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step(schedule_progress(cfg, step, spe, 0.0))
        assert _lrs(opt2) == _lrs(opt)
    assert _lrs(opt)[0] == pytest.approx(LR_MIN)  # the end of the cosine


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        warmup_fraction("cosine", 1, 1, 1, 1)
