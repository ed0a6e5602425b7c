"""The fine-tuning round: claim, split, train, evaluate, publish only if not worse, pointer, report, CLI."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from backend.learning.corrections import CorrectionWorker
from tests.payloads import annotation_event
from backend.learning.datastore import open_datastore
from backend.learning import versions
from backend.learning.finetune import (FinetuneConfig, config_from_args, is_heldout, register_cli,
                                       round_click_sim, round_patch_loss_weight, run_once, split_samples, watch)
from ssp_sam.build import ModelConfig
from ssp_sam.train import config_from_preset

LS = "http://ls.test"


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _synthetic(n: int, seed: int, **kw):
    from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

    cfg = SyntheticConfig(domain="novel", kind_weights={"attr": 0.6, "abs_pos": 0.2, "multi": 0.2}, **kw)
    return SyntheticDataset(n, seed=seed, config=cfg)


def ingest(store, requests_mock, samples, first_task: int = 1, origin: str = "manual",
           model_version: str | None = None) -> None:
    """Send each sample through the inbox as the ANNOTATION_CREATED webhook Label Studio posts; drain it."""
    for k, s in enumerate(samples):
        tid = first_task + k
        url = f"/data/upload/1/img{tid}.png"
        requests_mock.get(LS + url, content=_png(s.image))
        store.enqueue_event("ANNOTATION_CREATED", annotation_event(
            "ANNOTATION_CREATED", 10_000 + tid, tid, 1, url, s.sentence, s.mask, origin=origin,
            model_version=model_version))
    fetch = lambda url, task: requests.get(LS + url, timeout=5).content  # noqa: E731
    CorrectionWorker(store, fetch).drain()
    assert store.stats()["events"]["failed"] == 0


def _cfg(tmp_path, base, train=None, **kw) -> FinetuneConfig:
    """A CPU-sized round on the tiny variant: one epoch of at most two steps."""
    recipe = dict(epochs=1, max_steps=2, batch_size=4, lr=1e-3, lr_decoder=1e-3, eval_batch_size=8, **(train or {}))
    d = dict(model_dir=str(tmp_path), heldout_fraction=0.3, min_train=2, min_heldout=1, curve_every=1,
             model=ModelConfig(variant="tiny", checkpoint=base, device="cpu"),
             train=config_from_preset("finetune", **recipe))
    d.update(kw)
    return FinetuneConfig(**d)


def test_heldout_split_is_deterministic_and_by_task():
    rows = [{"task_id": t, "project_id": 1, "id": i} for i, t in enumerate(list(range(200)) * 2)]
    train, held = split_samples(rows, 0.2)
    assert 0.1 < len(held) / len(rows) < 0.3
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in held}  # a task is on one side only
    assert split_samples(rows, 0.2) == (train, held)
    assert is_heldout(5, 0.2, 1) == is_heldout(5, 0.2, 1)
    assert not any(is_heldout(t, 0.0) for t in range(50))


def test_round_publishes_then_skips_then_rejects(tmp_path, tiny_bundle, requests_mock):
    store = open_datastore(None, tmp_path)
    ingest(store, requests_mock, _synthetic(12, seed=3, min_size=48, max_size=64))
    store.enqueue_event("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 1}})
    CorrectionWorker(store, lambda u, t: b"").drain()
    assert len(store.pending_training_requests()) == 1
    assert versions.read_current(tmp_path) is None

    # 1) tolerance 1.0: always good enough -> published, pointer written, claim completed, request handled
    rep = run_once(_cfg(tmp_path, tiny_bundle, tolerance=1.0), store=store)
    assert rep["decision"] == "published", rep.get("reason")
    ptr = json.loads((tmp_path / "versions" / "current.json").read_text())
    assert set(ptr) >= {"version", "path", "parent", "created_at", "metrics"}
    from ssp_sam.versioning import file_digest

    # the parent is named as the backend serves the base model: <variant>-<sha8 of the file>
    assert ptr["version"] == rep["version"] and ptr["parent"] == f"tiny-{file_digest(tiny_bundle)}"
    assert (tmp_path / "versions" / ptr["path"]).exists()
    assert store.count_new_samples() == 0 and store.pending_training_requests() == []
    assert [v["version"] for v in store.list_versions()] == [rep["version"]]
    run_dir = tmp_path / "runs" / rep["run_id"]
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "curve.png").stat().st_size > 1000
    assert {"before", "after", "version_stats", "n_train", "n_heldout", "curve"} <= set(report)
    assert report["n_train"] + report["n_heldout"] == 12 and report["n_heldout"] >= 1
    # the published bundle loads and names its version
    from ssp_sam.build import ModelConfig, load_model

    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(tmp_path / "versions" / ptr["path"]),
                                    device="cpu"))
    assert loaded.meta.get("version") == ptr["version"] and loaded.meta.get("parent") == ptr["parent"]

    # 2) nothing new -> skipped, pointer unchanged
    rep2 = run_once(_cfg(tmp_path, tiny_bundle), store=store)
    assert rep2["decision"] == "skipped" and "new samples" in rep2["reason"]
    assert json.loads((tmp_path / "versions" / "current.json").read_text())["version"] == ptr["version"]

    # 3) new corrections, impossible tolerance -> rejected: pointer unchanged, claim completed, reason recorded
    ingest(store, requests_mock, _synthetic(4, seed=4, min_size=48, max_size=64), first_task=100)
    rep3 = run_once(_cfg(tmp_path, tiny_bundle, tolerance=-1.0), store=store)
    assert rep3["decision"] == "rejected" and "held-out mIoU" in rep3["reason"]
    assert rep3["parent"]["version"] == ptr["version"]  # started from the published model
    assert json.loads((tmp_path / "versions" / "current.json").read_text())["version"] == ptr["version"]
    assert store.count_new_samples() == 0
    runs = {r["run_id"]: r for r in store.list_runs()}
    assert runs[rep3["run_id"]]["published"] == 0 and "held-out" in runs[rep3["run_id"]]["reason"]
    store.close()


def test_failed_round_releases_the_claim(tmp_path, tiny_bundle, requests_mock, monkeypatch):
    store = open_datastore(None, tmp_path)
    ingest(store, requests_mock, _synthetic(8, seed=5, min_size=48, max_size=64))
    import ssp_sam.train

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    seen = []
    monkeypatch.setattr(ssp_sam.train, "train", lambda cfg, *a, **k: seen.append(cfg) or boom())
    with pytest.raises(RuntimeError):
        run_once(_cfg(tmp_path, tiny_bundle, train={"aug_translate": False}), store=store)
    assert seen[0].aug_translate is False  # the round's options reach the trainer
    assert (seen[0].patch_loss_weight, seen[0].patch_head_fit_steps) == (0.0, 200)  # tiny's preset: no patch loss
    assert store.count_new_samples() == 8  # nothing lost
    assert store.list_runs()[-1]["status"] == "failed"
    store.close()


def test_patch_loss_weight_is_the_start_models_own():
    """A round fine-tunes with the objective its start model was trained with, read from the bundle: the demo's
    20; none recorded (official checkpoints, the tiny test bundle) means 0; a configured weight wins."""
    from ssp_sam.build import load_model

    demo = load_model(ModelConfig(variant="demo", device="cpu"))
    official_like = type("Loaded", (), {"meta": {}})()
    assert round_patch_loss_weight(FinetuneConfig(), demo) == 20.0
    assert round_patch_loss_weight(FinetuneConfig(), official_like) == 0.0
    assert round_patch_loss_weight(FinetuneConfig(patch_loss_weight=0), demo) == 0.0
    assert round_patch_loss_weight(FinetuneConfig(patch_loss_weight=5), official_like) == 5.0


def test_a_click_trained_start_model_keeps_training_with_clicks(tmp_path, tiny_bundle, requests_mock, monkeypatch):
    """A round keeps the start model's click ability: ``click_sim`` comes from its bundle (a configured value wins),
    and the round's report has held-out IoU after 0..3 simulated clicks, before and after."""
    from ssp_sam.build import load_model
    from ssp_sam.checkpoints import save_bundle

    tiny = load_model(ModelConfig(variant="tiny", checkpoint=tiny_bundle, device="cpu"))
    clicky = save_bundle(tiny.model, tiny.tokenizer, tmp_path / "clicky.pt",
                         meta={"train_config": {"click_sim": True}})
    loaded = load_model(ModelConfig(variant="tiny", checkpoint=str(clicky), device="cpu"))
    assert round_click_sim(FinetuneConfig(), loaded) is True
    assert round_click_sim(FinetuneConfig(), tiny) is False
    assert round_click_sim(FinetuneConfig(click_sim=False), loaded) is False

    store = open_datastore(None, tmp_path)
    ingest(store, requests_mock, _synthetic(10, seed=3, min_size=48, max_size=64))
    rep = run_once(_cfg(tmp_path, str(clicky), tolerance=1.0), store=store)
    assert rep["decision"] == "published", rep.get("reason")
    report = json.loads((tmp_path / "runs" / rep["run_id"] / "report.json").read_text())
    assert report["train_config"]["click_sim"] is True
    for key in ("clicks_before", "clicks_after"):
        assert set(report[key]) >= {"sentence+clicks/IoU@3", "clicks/IoU@1"}
    published = load_model(ModelConfig(variant="tiny", checkpoint=str(versions.bundle_path(tmp_path, rep["version"])),
                                       device="cpu"))
    assert round_click_sim(FinetuneConfig(), published) is True      # and so does the next round
    store.close()


def test_options_come_from_the_environment_then_the_command_line(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    env = {"MODEL_DIR": str(tmp_path / "md"), "SSP_SAM_VARIANT": "tiny", "DEVICE": "cpu",
           "DATASTORE_URL": "postgresql://u@db/x"}
    cfg = config_from_args(parser.parse_args(["finetune"]), env)
    assert (cfg.model_dir, cfg.datastore_url, cfg.model.variant, cfg.model.device) == (
        str(tmp_path / "md"), "postgresql://u@db/x", "tiny", "cpu")
    assert cfg.train == config_from_preset("finetune") and cfg.patch_loss_weight is None
    cfg = config_from_args(parser.parse_args(["finetune", "--model-dir", "elsewhere", "--base-checkpoint", "b.pt",
                                              "--epochs", "3", "--no-aug-translate", "--heldout", "0.5"]), env)
    assert (cfg.model_dir, cfg.model.checkpoint, cfg.train.epochs, cfg.train.aug_translate, cfg.heldout_fraction) == (
        "elsewhere", "b.pt", 3, False, 0.5)
    assert cfg.train.lr == config_from_preset("finetune").lr       # what was not given keeps the preset's value
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--aug-translate", "maybe"])


def test_cli_and_watch(tmp_path, tiny_bundle, requests_mock, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    args = parser.parse_args(["finetune", "--once", "--model-dir", str(tmp_path), "--variant", "tiny",
                              "--base-checkpoint", tiny_bundle, "--heldout", "0.3", "--max-steps", "1",
                              "--min-train", "2", "--min-heldout", "1", "--device", "cpu", "--tolerance", "1"])
    assert args.heldout_fraction == 0.3 and args.max_steps == 1 and args.tolerance == 1.0
    flags = parser.parse_args(["finetune", "--patch-loss-weight", "0", "--patch-head-fit-steps", "50"])
    assert (flags.patch_loss_weight, flags.patch_head_fit_steps) == (0.0, 50)
    # no samples: a skipped round is a success (exit 0)
    assert args.func(args) == 0

    store = open_datastore(None, tmp_path)
    ingest(store, requests_mock, _synthetic(8, seed=6, min_size=48, max_size=64))
    stop = threading.Event()
    cfg = _cfg(tmp_path, tiny_bundle, tolerance=1.0, every_samples=100, every_minutes=999, poll_s=0.05,
               max_rounds=1)
    store.add_training_request(1)  # START_TRAINING triggers a round although only 8 < 100 samples are new
    reports = watch(cfg, store=store, stop=stop)
    assert [r["decision"] for r in reports] == ["published"]
    assert store.pending_training_requests() == []
    store.close()


def test_ssp_sam_command_has_finetune():
    from backend.cli import build_parser

    args = build_parser().parse_args(["finetune", "--once", "--epochs", "3"])
    assert args.func.__module__ == register_cli.__module__ and args.epochs == 3


@pytest.mark.postgres
def test_round_on_postgres(tmp_path, tiny_bundle, requests_mock):
    from tests.learning import postgres

    store = open_datastore(postgres.require_postgres(), tmp_path, schema=postgres.new_schema_name())
    try:
        ingest(store, requests_mock, _synthetic(10, seed=8, min_size=48, max_size=64))
        rep = run_once(_cfg(tmp_path, tiny_bundle, tolerance=1.0), store=store)
        assert rep["decision"] == "published"
        assert store.list_versions()[0]["version"] == rep["version"] and store.count_new_samples() == 0
    finally:
        store.drop_schema()
        store.close()
