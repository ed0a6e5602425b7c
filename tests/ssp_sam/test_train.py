"""The training loop on the tiny variant: it runs, learns a little, resumes exactly, and its CLI parses."""

import argparse
import dataclasses
import math

import pytest
import torch

from ssp_sam.batches import TrainView, collate, forward_batch
from ssp_sam.build import build_model
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.evaluate import evaluate_model
from ssp_sam.train import (PRESETS, TrainConfig, config_from_args, config_from_preset, fit_patch_head, param_groups,
                           register_cli, train)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = SyntheticDataset(24, seed=0)
VAL = SyntheticDataset(8, seed=1)


def _cfg(tmp_path, **kw):
    return config_from_preset("tiny", out_dir=str(tmp_path), **kw)


def test_param_groups_and_view():
    model = build_model("tiny", seed=0)
    groups = param_groups(model, TrainConfig(lr=1e-4, lr_decoder=1e-5))
    dec = {id(p) for m in (model.sam.mask_decoder, model.sam.prompt_encoder) for p in m.parameters()}
    assert groups[1]["lr"] == 1e-5 and {id(p) for p in groups[1]["params"]} == dec
    assert not any(id(p) in dec for p in groups[0]["params"])
    view = TrainView(TRAIN, model.spec, augment=True, seed=0)
    batch = collate([view[i] for i in range(3)])
    s = model.spec
    assert batch["clip"].shape == (3, 3, s.clip_image_size, s.clip_image_size)
    assert batch["sam"].shape == (3, 3, s.sam_image_size, s.sam_image_size)
    assert batch["mask"].shape == (3, s.frame_size, s.frame_size)
    for k in range(3):  # a target's box is inside the CLIP square; a no-target sample's box loss is masked
        if batch["valid"][k]:
            assert 0 < batch["box"][k, 2] <= 1 and 0 <= batch["box"][k, 0] <= 1
        else:
            assert TRAIN[k].mask.sum() == 0
    # random placement (of a non-square image) depends on the epoch, and is reproducible
    i = next(k for k in range(len(TRAIN)) if abs(TRAIN[k].image.shape[0] - TRAIN[k].image.shape[1]) > 20)
    placements = set()
    for epoch in range(4):
        view.epoch = epoch
        placements.add(view[i]["clip"].sum().item())
    view.epoch = 0
    assert torch.equal(view[i]["clip"], view[i]["clip"]) and len(placements) > 1


def test_train_runs_and_reports(tmp_path):
    seen = []
    result = train(_cfg(tmp_path, epochs=2), train_set=TRAIN, val_set=VAL, on_epoch_end=seen.append)
    assert len(result.history) == 2 and len(seen) == 2 and result.steps == 2 * 6
    rec = result.history[-1]
    assert math.isfinite(rec["train/total"]) and 0 <= rec["val/mIoU"] <= 1 and "val/orig/mIoU" in rec
    for name in ("last.pt", "best.pt", "log.csv", "epochs.csv", "curves.png"):
        assert (tmp_path / name).exists(), name
    from ssp_sam.build import ModelConfig, load_model

    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(result.best_path), device="cpu"))
    assert loaded.meta["epoch"] == result.best_epoch
    m = evaluate_model(loaded.model, loaded.tokenizer, VAL)
    assert m["mIoU"] == pytest.approx(result.best_metrics["mIoU"])


def test_a_bundle_records_the_variants_training_flags_not_the_runs(tmp_path):
    """A run that freezes CLIP and the SAM encoder (the demo's click stage) saves a bundle whose spec still says what
    the variant trains, so later rounds fine-tune as the variant does; the run's choice is in meta.train_config."""
    from ssp_sam.build import VARIANTS, ModelConfig, load_model

    result = train(_cfg(tmp_path, train_clip=False, train_sam_encoder=False, max_steps=1), train_set=TRAIN,
                   val_set=VAL)
    assert result.model.spec.train_clip is False            # the run itself trained without CLIP
    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(result.best_path), device="cpu"))
    assert (loaded.spec.train_clip, loaded.spec.train_sam_encoder) == \
        (VARIANTS["tiny"].train_clip, VARIANTS["tiny"].train_sam_encoder) == (True, True)
    assert loaded.meta["train_config"]["train_clip"] is False


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    model = build_model("tiny", seed=0)
    small = [TRAIN[i] for i in range(4)]
    res = train(_cfg(tmp_path, epochs=40, save_checkpoints=False, lr=3e-3, lr_decoder=3e-3, aug_translate=False),
                model=model, train_set=small, val_set=None)
    first, last = res.history[0]["train/total"], res.history[-1]["train/total"]
    assert last < 0.7 * first, (first, last)


def test_resume_is_exact(tmp_path):
    full = train(_cfg(tmp_path / "a", epochs=2), train_set=TRAIN, val_set=VAL)
    train(_cfg(tmp_path / "b", epochs=2), train_set=TRAIN, val_set=VAL, on_epoch_end=lambda r: True)
    resumed = train(_cfg(tmp_path / "b", epochs=2, resume="auto"), train_set=TRAIN, val_set=VAL)
    assert resumed.steps == full.steps and len(resumed.history) == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_frozen_encoder_uses_cached_embeddings(tmp_path, monkeypatch):
    model = build_model("tiny", seed=0)
    calls = []
    enc = model.sam.image_encoder
    orig = enc.forward
    monkeypatch.setattr(enc, "forward", lambda x: calls.append(x.shape[0]) or orig(x))
    train(_cfg(tmp_path, train_sam_encoder=False, train_clip=False, max_steps=3, save_checkpoints=False),
          model=model, train_set=TRAIN, val_set=VAL)
    assert sum(calls) == len(TRAIN) + len(VAL)  # each image embedded once, not per step
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_cli_config_parsing():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["train", "--preset", "demo", "--epochs", "3", "--lr", "1e-3", "--no-aug-translate",
                              "--train-clip", "false", "--max-steps", "7", "--box-only"])
    cfg = config_from_args(args)
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.aug_translate is False and cfg.train_clip is False
    assert cfg.max_steps == 7 and cfg.box_only is True and cfg.batch_size == PRESETS["demo"]["batch_size"]
    assert cfg.train_sam_encoder is True  # the preset's, not overridden
    for flags, want in ((["--aug-translate"], True), (["--aug-translate", "false"], False),
                        (["--aug-translate", "true"], True), (["--no-aug-translate"], False), ([], False)):
        assert config_from_args(parser.parse_args(["train", "--preset", "demo", *flags])).aug_translate is want
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()  # no preset, no options: the defaults
    for removed in ("--aug-flip", "--sentences-per-image", "--grounding-loss-weight", "--official-no-target-box"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", removed, "1"])
    with pytest.raises(ValueError):
        config_from_preset("nope")


def test_every_option_has_help():
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help")]
    assert missing == []


def test_finetune_preset_is_the_round_recipe():
    """The fine-tuning round (backend/learning/finetune.py) used to build this TrainConfig by hand from its defaults;
    the preset plus what the caller gives must be the same config."""
    before = TrainConfig(variant="demo", train_data="", val_data="", epochs=10, max_steps=None, batch_size=8,
                         lr=1e-4, lr_decoder=1e-4, lr_min=min(1e-4, 1e-4) / 100, warmup_epochs=0.0,
                         freeze_decoder_epochs=0, clip_grad=1.0, aug_translate=True, train_sam_encoder=None,
                         train_clip=None, patch_loss_weight=20.0, patch_head_fit_steps=200, seed=3407,
                         out_dir="x/train", save_checkpoints=False, device="auto", progress=False,
                         log_every=10 ** 9, eval_batch_size=16, threads=None)
    preset = config_from_preset("finetune", variant="demo", train_data="", val_data="", patch_loss_weight=20.0,
                                out_dir="x/train")
    assert preset == before
    assert not {"variant", "train_data", "val_data", "patch_loss_weight"} & set(PRESETS["finetune"])


def test_referent_patch_loss_trains_a_head_that_resumes_and_stays_out_of_the_bundle(tmp_path):
    kw = dict(epochs=2, patch_loss_weight=2.0)
    full = train(_cfg(tmp_path / "a", **kw), train_set=TRAIN, val_set=VAL)
    assert all(math.isfinite(h["train/patch"]) and h["train/patch"] > 0 for h in full.history)
    train(_cfg(tmp_path / "b", **kw), train_set=TRAIN, val_set=VAL, on_epoch_end=lambda r: True)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["patch_head"] is not None
    resumed = train(_cfg(tmp_path / "b", resume="auto", **kw), train_set=TRAIN, val_set=VAL)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # equal only if the head's weights and optimiser state were restored too
    from ssp_sam.build import ModelConfig, load_model

    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(full.best_path), device="cpu"))
    assert set(loaded.model.state_dict()) == set(build_model("tiny").state_dict())


def test_patch_head_fit_is_a_linear_probe_of_the_start_model(tmp_path):
    from ssp_sam.losses import referent_patch_loss
    from ssp_sam.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    tok = load_tokenizer(model.spec)
    view = TrainView(TRAIN, model.spec, augment=False, clip_grid=True)
    loader = torch.utils.data.DataLoader(view, batch_size=8, collate_fn=collate)
    head = torch.nn.Linear(model.spec.prompt_dim, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def probe_loss():
        with torch.no_grad():
            return sum(float(referent_patch_loss(head(forward_batch(model.eval(), b, tok, torch.device("cpu"))
                                                      .visual_out)[..., 0], b["grid"])) for b in loader)

    cold = probe_loss()
    fit_patch_head(model.train(), head, loader, tok, torch.device("cpu"), steps=100)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    assert probe_loss() < 0.5 * cold  # the head fits the start model's outputs
    batches = []
    counting = type("Counting", (), {"__iter__": lambda self: (batches.append(b) or b for b in loader)})()
    fit_patch_head(model, head, counting, tok, torch.device("cpu"), steps=1, max_samples=8)
    assert len(batches) == 1  # memory bound: the probe stops reading once it has max_samples outputs
    # through train(): the first step's patch loss starts from the fitted head
    first = {n: train(_cfg(tmp_path / str(n), epochs=1, max_steps=1, patch_loss_weight=2.0, patch_head_fit_steps=n,
                           save_checkpoints=False), train_set=TRAIN).history[0]["train/patch"] for n in (0, 100)}
    assert first[100] < first[0]


def test_grounding_warmup_trains_everything_but_sam(tmp_path):
    """While ``ground_first_min`` lasts, steps are box-only: SAM (encoder and decoder) is not run and keeps its
    weights; the SSP encoder, prompt generator and box head learn. With 0 (the default) SAM trains from the start."""
    def changed(before, after, prefix):
        return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]

    for minutes, sam_trains in ((60.0, False), (0.0, True)):
        model = build_model("tiny", seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        res = train(_cfg(tmp_path / str(minutes), epochs=1, ground_first_min=minutes, patch_loss_weight=2.0,
                         save_checkpoints=False), model=model, train_set=TRAIN, val_set=None)
        after = model.state_dict()
        assert bool(changed(before, after, "sam.")) == sam_trains
        assert changed(before, after, "prompt_generator.") and changed(before, after, "vad.")
        assert ("train/dice" in res.history[0]) == sam_trains and res.history[0]["train/patch"] > 0
