"""The training loop on the tiny variant: it runs, learns a little, resumes exactly, and its CLI parses."""

import argparse
import math

import pytest
import torch

from ssp_sam.build import build_model
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.train import (PRESETS, ImageGroupBatchSampler, TrainConfig, TrainView, _forward, collate,
                           config_from_args, config_from_preset, evaluate_model, lr_factor, param_groups, register_cli,
                           train)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = SyntheticDataset(24, seed=0)
VAL = SyntheticDataset(8, seed=1)


def _cfg(tmp_path, **kw):
    return config_from_preset("tiny", out_dir=str(tmp_path), **kw)


def test_lr_schedule_shape():
    # warm-up from lr_min to base, cosine back to lr_min
    assert lr_factor(0, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01)
    assert lr_factor(10, 100, 10, 1e-3, 1e-5) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01)


def test_param_groups_and_view():
    model = build_model("tiny", seed=0)
    groups = param_groups(model, TrainConfig(lr=1e-4, lr_decoder=1e-5))
    dec = {id(p) for p in model.sam.mask_decoder.parameters()}
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


def test_flip_view_mirrors_image_mask_box_and_sentence():
    from ssp_sam.transforms import hflip_sample, swap_left_right

    assert swap_left_right("The leftmost star, left of the Right square; lefty") == \
        "The rightmost star, right of the Left square; lefty"
    model = build_model("tiny", seed=0)
    i = next(k for k in range(len(TRAIN)) if TRAIN[k].mask.any() and TRAIN[k].image.shape[0] != TRAIN[k].image.shape[1])
    s, f = TRAIN[i], hflip_sample(TRAIN[i])
    w = s.image.shape[1]
    assert (f.image == s.image[:, ::-1]).all() and (f.mask == s.mask[:, ::-1]).all()
    assert f.box_xyxy.tolist() == [w - s.box_xyxy[2], s.box_xyxy[1], w - s.box_xyxy[0], s.box_xyxy[3]]
    plain = TrainView(TRAIN, model.spec, augment=False, seed=0)
    always = TrainView(TRAIN, model.spec, augment=False, seed=0, flip=1.0)
    a, b = plain[i], always[i]
    assert b["sentence"] == swap_left_right(a["sentence"]) and b["index"] == i
    assert torch.equal(b["mask"], TrainView([f], model.spec, augment=False)[0]["mask"])  # mirrored before padding
    assert not torch.equal(a["mask"], b["mask"])
    assert torch.equal(plain[i]["mask"], a["mask"])  # the two orientations are cached apart
    half = TrainView(TRAIN, model.spec, augment=False, seed=0, flip=0.5)
    flips = [half[k]["sentence"] != plain[k]["sentence"] or not torch.equal(half[k]["mask"], plain[k]["mask"])
             for k in range(len(TRAIN))]
    assert 0 < sum(flips) < len(TRAIN)


def test_flip_with_a_frozen_encoder_embeds_the_mirrored_images(tmp_path, monkeypatch):
    import ssp_sam.train as train_mod

    embedded, real = [], train_mod.precompute_embeddings  # train set, its mirror, the validation set
    monkeypatch.setattr(train_mod, "precompute_embeddings",
                        lambda model, samples, *a, **k: embedded.append([samples[0].image.copy()]) or
                        real(model, samples, *a, **k))
    res = train(_cfg(tmp_path, epochs=1, save_checkpoints=False, aug_flip=0.5, train_sam_encoder=False),
                train_set=TRAIN, val_set=None)
    assert res.steps == 6 and math.isfinite(res.history[-1]["train/total"])
    assert len(embedded) == 3 and (embedded[1][0] == TRAIN[0].image[:, ::-1]).all()


def test_flip_refuses_an_embedding_cache_without_mirrored_images(tmp_path):
    with pytest.raises(ValueError, match="aug-flip"):
        train(_cfg(tmp_path, aug_flip=0.5, train_sam_encoder=False, embeddings_dir=str(tmp_path / "nowhere")),
              train_set=TRAIN, val_set=None)


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
                              "--train-clip", "false", "--max-steps", "7"])
    cfg = config_from_args(args)
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.aug_translate is False and cfg.train_clip is False
    assert cfg.max_steps == 7 and cfg.batch_size == PRESETS["demo"]["batch_size"]
    with pytest.raises(ValueError):
        config_from_preset("nope")


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
    from ssp_sam.train import _fit_patch_head

    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    tok = load_tokenizer(model.spec)
    view = TrainView(TRAIN, model.spec, augment=False, clip_grid=True)
    loader = torch.utils.data.DataLoader(view, batch_size=8, collate_fn=collate)
    head = torch.nn.Linear(model.spec.prompt_dim, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def probe_loss():
        with torch.no_grad():
            return sum(float(referent_patch_loss(head(_forward(model.eval(), b, tok, torch.device("cpu")).visual_out)
                                                 [..., 0], b["grid"])) for b in loader)

    cold = probe_loss()
    _fit_patch_head(model.train(), head, loader, tok, torch.device("cpu"), steps=100, world=1)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    assert probe_loss() < 0.5 * cold  # the head fits the start model's outputs
    batches = []
    counting = type("Counting", (), {"__iter__": lambda self: (batches.append(b) or b for b in loader)})()
    _fit_patch_head(model, head, counting, tok, torch.device("cpu"), steps=1, world=1, max_samples=8)
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


def test_image_group_batches():
    # images with exactly 2 sentences, batches of 4: every batch is 2 images x 2 sentences
    smp = ImageGroupBatchSampler([i // 2 for i in range(20)], batch_size=4, per_image=2, seed=0)
    assert len(smp) == 5 and all(sorted(b[k] // 2 for k in range(4)).count(b[0] // 2) == 2 for b in smp)
    # ragged images (5, 2, 1, 3, 4 sentences) on two ranks
    groups = [0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 4]
    seen = []
    for rank in (0, 1):
        smp = ImageGroupBatchSampler(groups, batch_size=4, per_image=2, rank=rank, world=2, seed=1)
        batches = list(smp)
        assert len(batches) == len(ImageGroupBatchSampler(groups, 4, 2, 1 - rank, 2, seed=1)) > 0
        assert all(1 <= len(b) <= 4 and len(set(b)) == len(b) for b in batches)
        seen += [i for b in batches for i in b]
        smp.set_epoch(1)
        again = list(smp)
        smp.set_epoch(0)
        assert list(smp) == batches and again != batches  # a function of (seed, epoch)
    assert len(seen) == len(set(seen))  # the ranks share nothing


def test_grouped_batch_runs_each_image_once_with_the_same_result(tmp_path, monkeypatch):
    data = SyntheticDataset(12, seed=4, config=__import__("ssp_sam.data.synthetic", fromlist=["x"]).SyntheticConfig(
        sentences_per_scene=3))
    from ssp_sam.data.datasets import image_groups

    groups = image_groups(data)
    assert groups == sorted(groups) and len(set(groups)) < len(data)
    model = build_model("tiny", seed=0).eval()
    from ssp_sam.tokenizer import load_tokenizer

    tok = load_tokenizer(model.spec)
    grouped = TrainView(data, model.spec, augment=True, seed=2, flip=0.5, groups=groups)
    batch = collate([grouped[i] for i in range(6)])
    assert batch["sam"].shape[0] == batch["clip"].shape[0] == len(set(groups[:6])) < 6
    assert batch["mask"].shape[0] == 6 and batch["image_index"].tolist() == [groups[i] - groups[0] for i in range(6)]
    items = [grouped[i] for i in range(6)]
    for it in items:
        del it["image"]
    repeated = collate(items)  # every sentence with its own copy of the image
    assert repeated["sam"].shape[0] == 6 and "image_index" not in repeated
    calls = []
    enc = model.sam.image_encoder
    orig = enc.forward
    monkeypatch.setattr(enc, "forward", lambda x: calls.append(x.shape[0]) or orig(x))
    with torch.no_grad():
        a = _forward(model, batch, tok, torch.device("cpu"))
        b = _forward(model, repeated, tok, torch.device("cpu"))
    assert calls == [batch["sam"].shape[0], 6]
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.box, b.box, atol=1e-6)
    res = train(_cfg(tmp_path, epochs=1, sentences_per_image=3, batch_size=6, save_checkpoints=False),
                train_set=data, val_set=None)
    assert res.steps >= 1 and math.isfinite(res.history[0]["train/total"])
