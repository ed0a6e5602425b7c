"""``ssp-sam finetune``: fine-tune the served model on annotators' corrections and publish it only if it is better.

One round (``--once``), or a loop (``--watch``) that starts a round every ``--every-samples`` new samples, every
``--every-minutes`` minutes (if anything is new), and on ``START_TRAINING`` requests recorded by the backend:

1. **Claim** the new samples in the datastore (``Datastore.claim_samples``, a lease renewed by a heartbeat; two
   trainers never take the same samples and a crashed trainer's samples come back when its lease expires).
2. **Split** every active sample deterministically into train / held-out by a hash of its task id (``--heldout``,
   20 % by default): a task is held out forever, so held-out scores of successive versions are comparable and no
   version ever trains on them.
3. **Start from the published model** (``MODEL_DIR/versions/current.json``, ``backend.learning.versions``), else the
   configured base model (the packaged demo bundle by default).
4. **Evaluate** held-out mIoU / oIoU / Pr@0.9 before, **fine-tune** (``ssp_sam.train.train`` with the ``finetune``
   preset; the referent-patch loss at the weight the start model was trained with), evaluate after.
5. **Publish** (``MODEL_DIR/versions/<version>/model.pt`` via ``ssp_sam.checkpoints.save_bundle``, a version row
   in the datastore, then an atomic replacement of ``current.json``) only when held-out mIoU did not drop by more
   than ``--tolerance``; otherwise keep the current model and record why. The claim is completed either way (the
   samples stay in the training pool of later rounds; only "new" changes).
6. **Report**: ``MODEL_DIR/runs/<run_id>/report.json`` and ``curve.png`` (held-out mIoU per epoch, train loss),
   with per-version acceptance stats from ``Datastore.version_stats()``.

Under ``torchrun`` every rank trains on its shard; rank 0 claims, decides and publishes, and broadcasts the samples
and the decision.
"""


from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from backend.config import BackendConfig, ConfigError
from backend.learning import versions
from backend.learning.datastore import ClaimLost, open_datastore
from backend.learning.leases import is_dead_local_owner, new_owner_id
from ssp_sam.build import ModelConfig
from ssp_sam.io import atomic_write, write_text_atomic
from ssp_sam.options import (add_dataclass_arguments, add_model_args, model_config_from_args, opt,
                             overrides_from_args)
from ssp_sam.train import PRESETS, TrainConfig, config_from_preset

log = logging.getLogger(__name__)

KEY_METRICS = ("mIoU", "oIoU", "Pr@0.90", "Pr@0.50", "n")
# The training options a round exposes (the rest of the "finetune" preset is fixed: no files, no validation set).
ROUND_TRAIN_OPTIONS = ("epochs", "max_steps", "batch_size", "lr", "lr_decoder", "lr_min", "warmup_epochs", "clip_grad",
                       "aug_translate", "train_sam_encoder", "train_clip", "patch_head_fit_steps", "seed",
                       "eval_batch_size", "threads")


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """One round (and the ``--watch`` loop): where corrections and versions live, the publish gate, the trigger. The
    start model is ``model`` (when nothing is published yet) and the training recipe ``train``, the ``finetune``
    preset of ``ssp_sam.train``."""

    model_dir: str = opt("./model_dir", "corrections datastore, blobs, published versions and run reports")
    datastore_url: str | None = opt(None, "postgresql://... for a shared datastore (default: SQLite in model_dir)")
    heldout_fraction: float = opt(0.2, "share of tasks held out by a hash of the task id, never trained on")
    tolerance: float = opt(0.0, "publish when held-out mIoU >= the start model's - tolerance (0..1 scale)")
    min_new_samples: int = opt(1, "a round needs this many new samples")
    min_train: int = opt(4, "a round needs this many training samples")
    min_heldout: int = opt(2, "a round needs this many held-out samples to validate")
    patch_loss_weight: float | None = opt(None, "weight of the auxiliary referent-patch loss (default: the weight the "
                                                "start model was trained with, from its bundle; 0 for official weights)")
    click_sim: bool | None = opt(None, "train with simulated clicks too, so the round keeps the model's click "
                                       "ability (default: what the start model was trained with, from its bundle)")
    curve_every: int = opt(1, "score held-out mIoU every this many epochs for the report's curve (0: off)")
    lease_s: float = opt(300.0, "claim lease in seconds, renewed every third of it while the round runs (a trainer "
                                "that dies frees its samples within this; at once for the next trainer on its host)")
    trainer_id: str | None = opt(None, "this trainer's name in the datastore (default: trainer:host:pid:random)")
    every_samples: int = opt(50, "--watch: start a round when this many new samples wait")
    every_minutes: float = opt(60.0, "--watch: start a round after this many minutes if anything is new")
    poll_s: float = opt(10.0, "--watch: seconds between datastore polls")
    max_rounds: int | None = opt(None, "--watch: stop after this many rounds")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: config_from_preset("finetune"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "FinetuneConfig":
        """The settings the backend reads from the environment (``MODEL_DIR``, ``DATASTORE_URL``,
        ``SSP_SAM_VARIANT``, the checkpoints, ``SSP_SAM_WEIGHTS_DIR``, ``DEVICE``, ``DTYPE``): the trainer and the
        server agree on them (``AUTO_DOWNLOAD``: :func:`prepare_weights`)."""
        b = BackendConfig.from_env(env)
        model = ModelConfig(variant=b.variant, checkpoint=b.checkpoint, sam_checkpoint=b.sam_checkpoint,
                            clip_checkpoint=b.clip_checkpoint, weights_dir=b.weights_dir, device=b.device,
                            dtype=b.dtype)
        return cls(**{"model_dir": b.model_dir, "datastore_url": b.datastore_url, "model": model, **overrides})

    @property
    def runs_dir(self) -> Path:
        return Path(self.model_dir) / "runs"


# ---------------------------------------------------------------------------------------------------------------------
# the pieces of a round
# ---------------------------------------------------------------------------------------------------------------------

def is_heldout(task_id: Any, fraction: float, project_id: Any = None) -> bool:
    """Deterministic held-out membership of a task (stable across runs, processes and machines)."""
    if fraction <= 0:
        return False
    key = f"{'' if project_id is None else project_id}:{task_id}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0 ** 64 < fraction


def split_samples(rows: Sequence[Mapping], fraction: float) -> tuple[list[Mapping], list[Mapping]]:
    train, held = [], []
    for r in rows:
        (held if is_heldout(r.get("task_id"), fraction, r.get("project_id")) else train).append(r)
    return train, held


def load_start_model(cfg: FinetuneConfig):
    """The model a round starts from: the published version, else the configured base. Returns (loaded, parent)."""
    from ssp_sam.build import load_model

    published = versions.read_current(cfg.model_dir)
    if published is not None:
        loaded = load_model(dataclasses.replace(cfg.model, checkpoint=published.path, version=published.version))
        return loaded, {"version": published.version, "path": published.path, "source": "pointer"}
    loaded = load_model(cfg.model)
    # load_model names the base <variant>-<sha8>, the same string the backend serves it under (ssp_sam.versioning)
    return loaded, {"version": loaded.version, "path": cfg.model.checkpoint, "source": "base"}


def round_patch_loss_weight(cfg: FinetuneConfig, loaded) -> float:
    """The configured weight, else the one the start model was trained with (a round keeps its base's objective:
    the demo's 20; official checkpoints carry none, so 0)."""
    if cfg.patch_loss_weight is not None:
        return float(cfg.patch_loss_weight)
    return float(((loaded.meta or {}).get("train_config") or {}).get("patch_loss_weight") or 0.0)


def round_click_sim(cfg: FinetuneConfig, loaded) -> bool:
    """The configured choice, else whether the start model was trained with simulated clicks (a round keeps the
    ability: the click-trained demo, and every version published from it, carry ``click_sim`` in their bundle)."""
    if cfg.click_sim is not None:
        return bool(cfg.click_sim)
    return bool(((loaded.meta or {}).get("train_config") or {}).get("click_sim"))


def round_train_config(cfg: FinetuneConfig, loaded, run_dir: Path) -> TrainConfig:
    """The round's TrainConfig: ``cfg.train`` for this start model, on the model's device."""
    return dataclasses.replace(cfg.train, variant=loaded.spec.name, train_data="", val_data="",
                               patch_loss_weight=round_patch_loss_weight(cfg, loaded),
                               click_sim=round_click_sim(cfg, loaded), device=str(loaded.device),
                               out_dir=str(run_dir / "train"))


def rows_to_samples(store, rows: Sequence[Mapping]) -> list:
    from ssp_sam.data import Sample

    out = []
    for r in rows:
        image, mask = store.load_sample(r)
        out.append(Sample(image=image, sentence=r["sentence"], mask=mask,
                          meta={"kind": r.get("origin") or "unknown", "sample_id": r.get("id"),
                                "task_id": r.get("task_id"), "model_version": r.get("model_version")}))
    return out


def _finite(m: Mapping | None) -> dict:
    """Metrics with NaN / inf as None (JSON has no NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in (m or {}).items()}


def _key(m: Mapping) -> dict:
    return {k: m.get(k) for k in KEY_METRICS if k in m}


class _Heartbeat:
    """Renews the claim's lease while a round runs (a crashed trainer simply stops renewing)."""

    def __init__(self, store, claim_id: str, lease_s: float):
        self.store, self.claim_id, self.lease_s = store, claim_id, lease_s
        self._stop = threading.Event()
        self.lost = False
        self._t = threading.Thread(target=self._run, daemon=True, name="finetune-heartbeat")

    def _run(self):
        while not self._stop.wait(max(1.0, self.lease_s / 3)):
            try:
                self.store.renew_claim(self.claim_id, self.lease_s)
            except ClaimLost:
                self.lost = True
                log.error("claim %s lost (lease expired)", self.claim_id)
                return
            except Exception as exc:  # database hiccup: try again next beat
                log.warning("lease renewal failed: %s", exc)

    def __enter__(self):
        if self.claim_id:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


# ---------------------------------------------------------------------------------------------------------------------
# one round: rank 0 claims, decides and publishes; under torchrun every rank trains on its shard
# ---------------------------------------------------------------------------------------------------------------------

def run_once(cfg: FinetuneConfig, store=None, force: bool = False) -> dict:
    """One fine-tuning round. Returns the report dict (``decision``: published | rejected | skipped | failed)."""
    from ssp_sam.build import resolve_device
    from ssp_sam.distributed import broadcast_object, init_distributed

    rank, world, _ = init_distributed(resolve_device(cfg.model.device))
    master = rank == 0
    run_id = broadcast_object(f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    own_store = store is None
    store = store or open_datastore(cfg.datastore_url, cfg.model_dir)
    trainer_id = cfg.trainer_id or new_owner_id("trainer")
    report: dict[str, Any] = {"run_id": run_id, "trainer_id": trainer_id, "world_size": world,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "config": dataclasses.asdict(cfg)}
    t0, claim = time.time(), None
    try:
        plan = None
        if master:
            plan, claim = _plan_round(cfg, store, run_id, trainer_id, report, force)
        plan = broadcast_object(plan)
        if plan["skip"]:
            if master:
                _skip_round(store, run_id, trainer_id, claim, plan["skip"], report)
            return report
        with _Heartbeat(store, claim.claim_id if master and claim else "", cfg.lease_s) as hb:
            result = _train_and_evaluate(cfg, store, plan, cfg.runs_dir / run_id, report)
            if hb.lost:
                raise RuntimeError("the claim's lease expired during training; another trainer owns the samples")
        decision = broadcast_object(_decide(cfg, result) if master else None)
        report.update(decision="published" if decision["publish"] else "rejected", reason=decision["reason"],
                      published=bool(decision["publish"]))
        if master:
            _conclude(cfg, store, run_id, claim, plan, result, report, t0)
        report["version"] = broadcast_object(report.get("version"))  # everyone leaves after rank 0 published
        return report
    except Exception as exc:
        if master:
            _fail_round(store, run_id, claim, exc, report)
        raise
    finally:
        if own_store:
            store.close()


def _plan_round(cfg: FinetuneConfig, store, run_id: str, trainer_id: str, report: dict, force: bool):
    """Rank 0: claim the new samples, split every active sample into train / held-out, and say whether the round
    can run (``plan["skip"]`` is the reason when it cannot)."""
    recover_dead_trainers(store)
    requests = store.pending_training_requests()
    claim = store.claim_samples(trainer_id, cfg.lease_s)
    rows = store.list_samples(active=True)
    train_rows, held_rows = split_samples(rows, cfg.heldout_fraction)
    report.update(claim_id=claim.claim_id or None, n_new=len(claim), n_active=len(rows), n_train=len(train_rows),
                  n_heldout=len(held_rows), training_requests=[r["id"] for r in requests])
    reason = None
    if len(claim) < max(1, cfg.min_new_samples) and not (force and rows):
        reason = f"{len(claim)} new samples (< {max(1, cfg.min_new_samples)})"
    elif len(train_rows) < cfg.min_train:
        reason = f"{len(train_rows)} training samples (< {cfg.min_train})"
    elif len(held_rows) < cfg.min_heldout:
        reason = f"{len(held_rows)} held-out samples (< {cfg.min_heldout}); cannot validate"
    if reason is None:
        store.start_run(run_id, trainer_id, claim.claim_id or None, None)
    plan = {"skip": reason, "train": [dict(r) for r in train_rows], "held": [dict(r) for r in held_rows]}
    return plan, claim


def recover_dead_trainers(store) -> int:
    """Release the claims of trainers of this host that are gone (``kill -9`` mid-round) so their samples are new
    again now, not after the lease; their runs are recorded as failed. Returns how many claims were released."""
    released = 0
    for claim in store.active_claims():
        if is_dead_local_owner(claim["trainer_id"]):
            store.release_claim(claim["claim_id"], note="the trainer process is gone")
            released += 1
    for run in store.list_runs():
        if run["status"] == "running" and is_dead_local_owner(run["trainer_id"]):
            store.finish_run(run["run_id"], "failed", False, None, "the trainer process died", {})
    if released:
        log.warning("released %d claim(s) of trainer processes that are gone", released)
    return released


def _skip_round(store, run_id: str, trainer_id: str, claim, reason: str, report: dict) -> None:
    if claim is not None and claim.claim_id:
        store.release_claim(claim.claim_id, note=reason)  # keep them new for the next round
    store.start_run(run_id, trainer_id, None, None)
    if report.get("training_requests"):
        store.mark_training_requests_handled(report["training_requests"], run_id)
    report.update(decision="skipped", reason=reason, published=False)
    store.finish_run(run_id, "skipped", False, None, reason, {})
    log.info("finetune round %s skipped: %s", run_id, reason)


def _train_and_evaluate(cfg: FinetuneConfig, store, plan: dict, run_dir: Path, report: dict) -> dict:
    """Score the start model on the held-out samples, fine-tune it on the training samples, score it again."""
    from ssp_sam.evaluate import evaluate_clicks, evaluate_model
    from ssp_sam.train import train

    loaded, parent = load_start_model(cfg)
    model, tok = loaded.model, loaded.tokenizer
    tcfg = round_train_config(cfg, loaded, run_dir)
    train_set, held_set = rows_to_samples(store, plan["train"]), rows_to_samples(store, plan["held"])
    report.update(parent=parent, patch_loss_weight=tcfg.patch_loss_weight, train_config=dataclasses.asdict(tcfg))

    def heldout(by_kind: bool = True, original_resolution: bool = True) -> dict:
        return _finite(evaluate_model(model, tok, held_set, batch_size=tcfg.eval_batch_size, by_kind=by_kind,
                                      original_resolution=original_resolution))

    def clicks() -> dict:
        """Held-out IoU after 0..3 simulated clicks (sentence then clicks; clicks only): the ability a round keeps."""
        c = evaluate_clicks(model, tok, held_set, max_clicks=3, report=(0, 1, 2, 3),
                            batch_size=tcfg.eval_batch_size)
        return _finite({k: v for k, v in c.items() if "/IoU@" in k})

    t = time.time()
    before = heldout()
    if tcfg.click_sim:
        report["clicks_before"] = clicks()
    report["eval_s"] = round(time.time() - t, 2)
    curve = [{"epoch": 0, "heldout_mIoU": before["mIoU"]}]

    def on_epoch_end(record):
        epoch = int(record.get("epoch", len(curve)))
        point = {"epoch": epoch, "train_loss": record.get("train/total")}
        if cfg.curve_every and (epoch % cfg.curve_every == 0 or epoch == tcfg.epochs):
            point["heldout_mIoU"] = heldout(by_kind=False, original_resolution=False)["mIoU"]
        curve.append(point)

    t = time.time()
    res = train(tcfg, model=model, tokenizer=tok, train_set=train_set, val_set=None, on_epoch_end=on_epoch_end)
    report.update(train_s=round(time.time() - t, 2), steps=res.steps)
    after = heldout()
    if tcfg.click_sim:
        report["clicks_after"] = clicks()
    report.update(before=before, after=after, delta_mIoU_points=round((after["mIoU"] - before["mIoU"]) * 100, 2),
                  curve=curve, history=[_finite(h) for h in res.history])
    return {"before": before, "after": after, "model": res.model, "tokenizer": tok, "parent": parent,
            "variant": loaded.spec.name, "train_config": tcfg}


def _decide(cfg: FinetuneConfig, result: dict) -> dict:
    """Publish only when held-out mIoU did not drop by more than the tolerance."""
    before, after = result["before"]["mIoU"], result["after"]["mIoU"]
    reason = (f"held-out mIoU {before:.4f} -> {after:.4f} ({(after - before) * 100:+.2f} points, tolerance "
              f"{cfg.tolerance * 100:.2f})")
    return {"publish": bool(after >= before - cfg.tolerance), "reason": reason}


def _conclude(cfg: FinetuneConfig, store, run_id: str, claim, plan: dict, result: dict, report: dict,
              t0: float) -> None:
    """Rank 0: publish (when decided), consume the claim, answer the training requests, write the report."""
    version = _publish(cfg, store, run_id, plan, result, report) if report["published"] else None
    report["version"] = version
    store.complete_claim(claim.claim_id, consumed_by=version or run_id, note=report["decision"])
    if report.get("training_requests"):
        store.mark_training_requests_handled(report["training_requests"], run_id)
    report["wall_time_s"] = round(time.time() - t0, 2)
    report["version_stats"] = store.version_stats()
    report_path = _write_report(cfg.runs_dir / run_id, report)
    store.finish_run(run_id, "done", bool(version), version, report["reason"],
                     {"before": _key(result["before"]), "after": _key(result["after"])}, str(report_path))
    log.info("finetune round %s: %s (%s)", run_id, report["decision"], report["reason"])


def _publish(cfg: FinetuneConfig, store, run_id: str, plan: dict, result: dict, report: dict) -> str:
    """Write the new version's bundle, record it, then point ``current.json`` at it (the backend hot-reloads)."""
    from ssp_sam.checkpoints import save_bundle

    version = versions.new_version_name(result["variant"])
    parent = result["parent"]["version"]
    metrics = {"heldout": _key(result["after"]), "heldout_before": _key(result["before"]),
               "n_train": len(plan["train"]), "n_heldout": len(plan["held"])}
    path = versions.bundle_path(cfg.model_dir, version)
    save_bundle(result["model"], result["tokenizer"], path,
                meta={"version": version, "parent": parent, "run_id": run_id, "metrics": metrics,
                      "created_at": time.time(), "train_config": dataclasses.asdict(result["train_config"])})
    store.record_version(version, str(path), parent, metrics, run_id, len(plan["train"]), len(plan["held"]))
    versions.publish(cfg.model_dir, version, {"parent": parent, "metrics": metrics, "run_id": run_id})
    report["version_path"] = str(path)
    return version


def _fail_round(store, run_id: str, claim, exc: Exception, report: dict) -> None:
    """Rank 0: give the samples back (nothing is lost) and record why the round failed."""
    log.exception("finetune round %s failed", run_id)
    reason = f"{type(exc).__name__}: {exc}"
    if claim is not None and claim.claim_id:
        try:
            store.release_claim(claim.claim_id, note=f"failed: {exc}")
        except Exception:
            log.exception("could not release claim %s", claim.claim_id)
    try:
        store.finish_run(run_id, "failed", False, None, reason, {})
    except Exception:
        log.exception("could not record the failed round %s", run_id)
    report.update(decision="failed", published=False, reason=reason)


def _write_report(run_dir: Path, report: dict) -> Path:
    path = run_dir / "report.json"
    write_text_atomic(path, json.dumps(report, indent=2, default=str, sort_keys=True))
    try:
        _plot(run_dir / "curve.png", report)
    except Exception as exc:  # a plotting problem never fails a round
        log.warning("could not draw the curve: %s", exc)
    return path


def _plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("curve") or []
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    pts = [(p["epoch"], p["heldout_mIoU"] * 100) for p in curve if p.get("heldout_mIoU") is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="held-out mIoU")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out mIoU (%)", color="tab:blue")
    losses = [(p["epoch"], p["train_loss"]) for p in curve if p.get("train_loss") is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in losses], [p[1] for p in losses], "s--", color="tab:red", label="train loss")
        ax2.set_ylabel("train loss", color="tab:red")
    ax.set_title(f"run {report['run_id']}: {report.get('decision')} "
                 f"({report.get('delta_mIoU_points', 0):+.1f} mIoU points)", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# watch
# ---------------------------------------------------------------------------------------------------------------------

def watch(cfg: FinetuneConfig, store=None, stop: threading.Event | None = None) -> list[dict]:
    """Run rounds when enough new samples arrived, on a timer, or on START_TRAINING requests."""
    from ssp_sam.build import resolve_device
    from ssp_sam.distributed import broadcast_object, init_distributed

    rank, _, _ = init_distributed(resolve_device(cfg.model.device))
    own = store is None
    if store is None and rank == 0:
        store = open_datastore(cfg.datastore_url, cfg.model_dir)
    stop = stop or threading.Event()
    reports: list[dict] = []
    last_run = time.time()
    skipped_at = -1  # new-sample count at the last skipped round: wait for more before trying again
    try:
        while not stop.is_set():
            go = broadcast_object(_round_due(cfg, store, last_run, skipped_at) if rank == 0 else None)
            if not go:
                stop.wait(cfg.poll_s)
                continue
            log.info("starting a finetune round (%s, %d new samples)", go["reason"], go["n_new"])
            try:
                rep = run_once(cfg, store=store)
            except Exception:
                rep = {"decision": "failed"}
            reports.append(rep)
            last_run = time.time()
            skipped_at = go["n_new"] if rep.get("decision") == "skipped" else -1
            if cfg.max_rounds and len(reports) >= cfg.max_rounds:
                break
    finally:
        if own and store is not None:
            store.close()
    return reports


def _round_due(cfg: FinetuneConfig, store, last_run: float, skipped_at: int) -> dict | None:
    """Rank 0: whether a round should start now, and why."""
    n_new = store.count_new_samples()
    requests = store.pending_training_requests()
    timer = (time.time() - last_run) / 60.0 >= cfg.every_minutes and n_new > 0
    if n_new != skipped_at and (n_new >= cfg.every_samples or requests or timer):
        reason = "requested" if requests else ("samples" if n_new >= cfg.every_samples else "timer")
        return {"reason": reason, "n_new": n_new}
    if requests and n_new == skipped_at:   # a request with nothing new: answer it with a skipped round
        return {"reason": "requested", "n_new": n_new}
    return None


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def register_cli(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune on annotators' corrections; publish only if better",
                              description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one round and exit (default)")
    mode.add_argument("--watch", action="store_true", help="keep running rounds as corrections arrive")
    p.add_argument("--force", action="store_true", help="run a round even without new samples")
    add_round_arguments(p)
    p.set_defaults(func=_cli)


def add_round_arguments(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """The options of a round: FinetuneConfig's, the start model's, and the training options of the preset (the
    command and ``bench/learn_from_corrections.py`` share them; ``skip`` leaves some to the caller)."""
    add_dataclass_arguments(parser, FinetuneConfig, skip=("model", "train", *skip),
                            flags={"heldout_fraction": ("--heldout",)},
                            defaults={"model_dir": "$MODEL_DIR, else ./model_dir",
                                      "datastore_url": "$DATASTORE_URL, else SQLite in model_dir"})
    add_model_args(parser, flags={"checkpoint": ("--base-checkpoint", "--checkpoint")})
    group = parser.add_argument_group("training (the finetune preset of ssp-sam train)")
    add_dataclass_arguments(group, TrainConfig, only=[o for o in ROUND_TRAIN_OPTIONS if o not in skip],
                            defaults=PRESETS["finetune"])


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> FinetuneConfig:
    """The environment's settings (``FinetuneConfig.from_env``), then every option the command line gave."""
    base = FinetuneConfig.from_env(env)
    train = dataclasses.replace(base.train, **overrides_from_args(TrainConfig, args))
    return dataclasses.replace(base, **overrides_from_args(FinetuneConfig, args),
                               model=model_config_from_args(args, base.model), train=train)


def prepare_weights(cfg: FinetuneConfig, env: Mapping[str, str] | None = None) -> FinetuneConfig:
    """``cfg`` with the weights the backend serves: with AUTO_DOWNLOAD, its folder in MODEL_DIR, downloaded first
    when missing (or waited for while the backend downloads it). Raises ConfigError for an official variant without
    any weights (the message names the command that fetches them)."""
    from backend.weights import missing_weights_message, trainer_weights_dir
    from ssp_sam.hub import WeightsError

    m = cfg.model
    b = dataclasses.replace(BackendConfig.from_env(env), model_dir=cfg.model_dir, variant=m.variant,
                            checkpoint=m.checkpoint, sam_checkpoint=m.sam_checkpoint,
                            clip_checkpoint=m.clip_checkpoint, weights_dir=m.weights_dir)
    if versions.read_current(cfg.model_dir) is None:          # a published version needs no base checkpoint
        problem = missing_weights_message(b)
        if problem:
            raise ConfigError(problem)
    try:
        folder = trainer_weights_dir(b)
    except WeightsError as exc:
        raise ConfigError(f"AUTO_DOWNLOAD: {exc}") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(m, weights_dir=folder))


def _cli(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ssp_sam.distributed import rank_and_world

    try:
        cfg = prepare_weights(config_from_args(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.watch:
            watch(cfg)
            return 0
        rep = run_once(cfg, force=args.force)
        master = rank_and_world()[0] == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if master:
        print(format_summary(rep))
    return 0 if rep.get("decision") in ("published", "rejected", "skipped") else 1


def format_summary(rep: Mapping) -> str:
    lines = [f"run {rep.get('run_id')}: {rep.get('decision')} - {rep.get('reason')}"]
    if rep.get("before") and rep.get("after"):
        lines.append(f"{'held-out':<10}{'mIoU':>8}{'oIoU':>8}{'Pr@0.9':>8}{'n':>6}")
        for name in ("before", "after"):
            m = rep[name]
            lines.append(f"{name:<10}{m['mIoU'] * 100:>8.2f}{m['oIoU'] * 100:>8.2f}{m.get('Pr@0.90', 0) * 100:>8.2f}"
                         f"{int(m.get('n', 0)):>6}")
    if rep.get("version"):
        lines.append(f"published {rep['version']}")
    return "\n".join(lines)
