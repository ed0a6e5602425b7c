"""``ssp-sam finetune``: fine-tune the served model on annotators' corrections and publish it only if it is better.

One round (``--once``), or a loop (``--watch``) that starts a round every ``--every-samples`` new samples, every
``--every-minutes`` minutes (if anything is new), and on ``START_TRAINING`` requests recorded by the backend:

1. **Claim** the new samples in the datastore (``Datastore.claim_samples``, a lease renewed by a heartbeat; two
   trainers never take the same samples and a crashed trainer's samples come back when its lease expires).
2. **Split** every active sample deterministically into train / held-out by a hash of its task id (``--heldout``,
   20 % by default): a task is held out forever, so held-out scores of successive versions are comparable and no
   version ever trains on them.
3. **Start from the published model** (``MODEL_DIR/versions/current.json``), else the configured base model (the
   packaged demo bundle by default).
4. **Evaluate** held-out mIoU / oIoU / Pr@0.9 before, **fine-tune** (``ssp_sam.train.train``), evaluate after.
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
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger("backend.learning.finetune")

KEY_METRICS = ("mIoU", "oIoU", "Pr@0.90", "Pr@0.50", "n")


# ---------------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    model_dir: str = "./model_dir"
    datastore_url: str | None = None          # None: $DATASTORE_URL, else SQLite MODEL_DIR/corrections.db
    variant: str = "demo"                     # base model when no version is published yet
    base_checkpoint: str | None = None        # None: the packaged demo bundle (variant "demo")
    heldout_fraction: float = 0.2
    tolerance: float = 0.0                    # publish when after.mIoU >= before.mIoU - tolerance (0..1 scale)
    min_new_samples: int = 1                  # a round needs at least this many new samples
    min_train: int = 4
    min_heldout: int = 2
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    lr_decoder: float = 1e-4
    warmup_epochs: float = 0.0
    clip_grad: float = 1.0
    aug_translate: bool = True
    train_sam_encoder: bool | None = None     # None: what the variant says (the demo trains its small encoder, which
                                              # is what makes it learn new shapes and colours; the official ViT
                                              # encoders stay frozen, their embeddings cached once)
    train_clip: bool | None = None            # None: what the variant says (the demo trains CLIP)
    patch_loss_weight: float | None = None    # auxiliary referent-patch loss (ssp_sam.losses); None: the weight of
                                              # the variant's training preset (the demo: 20; official variants: 0)
    patch_head_fit_steps: int = 200           # its head is first fitted alone on the start model (a linear probe)
    seed: int = 3407
    eval_batch_size: int = 16
    curve_every: int = 1                      # evaluate held-out mIoU every N epochs for the curve (0: off)
    device: str = "auto"
    threads: int | None = None
    lease_s: float = 1800.0
    trainer_id: str | None = None
    # --watch
    every_samples: int = 50
    every_minutes: float = 60.0
    poll_s: float = 10.0
    max_rounds: int | None = None

    @property
    def versions_dir(self) -> Path:
        return Path(self.model_dir) / "versions"

    @property
    def pointer(self) -> Path:
        return self.versions_dir / "current.json"

    @property
    def runs_dir(self) -> Path:
        return Path(self.model_dir) / "runs"


# ---------------------------------------------------------------------------------------------------------------------
# helpers
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


def read_pointer(cfg: FinetuneConfig) -> dict | None:
    try:
        data = json.loads(cfg.pointer.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("path"):
        return None
    p = Path(data["path"])
    if not p.is_absolute():
        for base in (cfg.pointer.parent, Path(cfg.model_dir)):
            if (base / p).exists():
                p = base / p
                break
    if not p.exists():
        log.warning("version pointer names a missing file %s; using the base model", p)
        return None
    data["resolved_path"] = str(p)
    return data


def write_pointer(cfg: FinetuneConfig, record: Mapping) -> None:
    """Atomically replace ``versions/current.json`` (temporary file in the same folder, fsync, ``os.replace``)."""
    cfg.versions_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".current.", suffix=".json", dir=cfg.versions_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cfg.pointer)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_base(cfg: FinetuneConfig):
    """The model to start from: the published version, else the configured base. Returns (loaded, parent_info)."""
    from ssp_sam.build import ModelConfig, load_model

    ptr = read_pointer(cfg)
    if ptr is not None:
        loaded = load_model(ModelConfig(variant=cfg.variant, checkpoint=ptr["resolved_path"], device=cfg.device,
                                        version=ptr.get("version") or None))
        return loaded, {"version": str(ptr.get("version") or loaded.version), "path": ptr["resolved_path"],
                        "source": "pointer"}
    loaded = load_model(ModelConfig(variant=cfg.variant, checkpoint=cfg.base_checkpoint, device=cfg.device))
    # load_model names the base <variant>-<sha8>, the same string the backend serves it under (ssp_sam.versioning)
    return loaded, {"version": loaded.version, "path": cfg.base_checkpoint, "source": "base"}


def rows_to_samples(store, rows: Sequence[Mapping]) -> list:
    from ssp_sam.data import Sample

    out = []
    for r in rows:
        image, mask = store.load_sample(r)
        out.append(Sample(image=image, sentence=r["sentence"], mask=mask,
                          meta={"kind": r.get("origin") or "unknown", "sample_id": r.get("id"),
                                "task_id": r.get("task_id"), "model_version": r.get("model_version")}))
    return out


def _clean(m: Mapping | None) -> dict:
    out = {}
    for k, v in (m or {}).items():
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            v = None
        out[k] = v
    return out


def _key(m: Mapping) -> dict:
    return {k: m.get(k) for k in KEY_METRICS if k in m}


def new_version_name(variant: str) -> str:
    return f"{variant}-ft-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


class _Heartbeat:
    """Renews the claim's lease while a round runs (a crashed trainer simply stops renewing)."""

    def __init__(self, store, claim_id: str, lease_s: float):
        self.store, self.claim_id, self.lease_s = store, claim_id, lease_s
        self._stop = threading.Event()
        self.lost = False
        self._t = threading.Thread(target=self._run, daemon=True, name="finetune-heartbeat")

    def _run(self):
        from backend.learning.datastore import ClaimLost

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
# distributed helpers (torchrun): rank 0 decides, everyone follows
# ---------------------------------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        import torch

        dev = "nccl" if torch.cuda.is_available() and os.environ.get("FINETUNE_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(dev)
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _broadcast(obj, dist):
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------------
# one round
# ---------------------------------------------------------------------------------------------------------------------

def run_once(cfg: FinetuneConfig, store=None, force: bool = False) -> dict:
    """One fine-tuning round. Returns the report dict (``decision``: published | rejected | skipped | failed)."""
    from backend.learning.datastore import open_datastore

    dist, rank, world = _dist()
    master = rank == 0
    trainer_id = cfg.trainer_id or f"{socket.gethostname()}-{os.getpid()}"
    run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    run_id = _broadcast(run_id, dist)
    own_store = store is None
    if store is None:
        store = open_datastore(cfg.datastore_url, cfg.model_dir)
    run_dir = cfg.runs_dir / run_id
    report: dict[str, Any] = {"run_id": run_id, "trainer_id": trainer_id, "world_size": world,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "config": dataclasses.asdict(cfg)}
    t0 = time.time()
    claim = None
    plan = None
    try:
        # ---- rank 0: claim and split ------------------------------------------------------------------------------
        if master:
            requests = store.pending_training_requests()
            claim = store.claim_samples(trainer_id, cfg.lease_s)
            rows = store.list_samples(active=True)
            train_rows, held_rows = split_samples(rows, cfg.heldout_fraction)
            report.update(claim_id=claim.claim_id or None, n_new=len(claim), n_active=len(rows),
                          n_train=len(train_rows), n_heldout=len(held_rows),
                          training_requests=[r["id"] for r in requests])
            reason = None
            if len(claim) < max(1, cfg.min_new_samples) and not (force and rows):
                reason = f"{len(claim)} new samples (< {max(1, cfg.min_new_samples)})"
            elif len(train_rows) < cfg.min_train:
                reason = f"{len(train_rows)} training samples (< {cfg.min_train})"
            elif len(held_rows) < cfg.min_heldout:
                reason = f"{len(held_rows)} held-out samples (< {cfg.min_heldout}); cannot validate"
            plan = {"skip": reason, "train": [dict(r) for r in train_rows], "held": [dict(r) for r in held_rows]}
            if reason is None:
                store.start_run(run_id, trainer_id, claim.claim_id or None, None)
        plan = _broadcast(plan, dist)
        if plan["skip"]:
            if master:
                if claim is not None and claim.claim_id:
                    store.release_claim(claim.claim_id, note=plan["skip"])  # keep them new for the next round
                store.start_run(run_id, trainer_id, None, None)
                if report.get("training_requests"):
                    store.mark_training_requests_handled(report["training_requests"], run_id)
                report.update(decision="skipped", reason=plan["skip"], published=False)
                store.finish_run(run_id, "skipped", False, None, plan["skip"], {})
                log.info("finetune round %s skipped: %s", run_id, plan["skip"])
            return report

        with _Heartbeat(store, claim.claim_id if master and claim else "", cfg.lease_s) as hb:
            result = _train_and_evaluate(cfg, store, plan, run_dir, report, master)
            if hb.lost:
                raise RuntimeError("the claim's lease expired during training; another trainer owns the samples")

        # ---- decide (rank 0), broadcast -------------------------------------------------------------------------
        decision = None
        if master:
            before, after = result["before"], result["after"]
            delta = after["mIoU"] - before["mIoU"]
            ok = after["mIoU"] >= before["mIoU"] - cfg.tolerance
            reason = (f"held-out mIoU {before['mIoU']:.4f} -> {after['mIoU']:.4f} ({delta * 100:+.2f} points, "
                      f"tolerance {cfg.tolerance * 100:.2f})")
            decision = {"publish": bool(ok), "reason": reason}
        decision = _broadcast(decision, dist)
        if master:
            parent = result["parent"]
            version = None
            if decision["publish"]:
                version = new_version_name(result["variant"])
                path = cfg.versions_dir / version / "model.pt"
                metrics = {"heldout": _key(result["after"]), "heldout_before": _key(result["before"]),
                           "n_train": len(plan["train"]), "n_heldout": len(plan["held"])}
                from ssp_sam.checkpoints import save_bundle

                save_bundle(result["model"], result["tokenizer"], path,
                            meta={"version": version, "parent": parent["version"], "run_id": run_id,
                                  "metrics": metrics, "created_at": time.time()})
                store.record_version(version, str(path), parent["version"], metrics, run_id,
                                     len(plan["train"]), len(plan["held"]))
                write_pointer(cfg, {"version": version, "path": f"{version}/model.pt", "parent": parent["version"],
                                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "metrics": metrics, "run_id": run_id})
                report["version_path"] = str(path)
            report.update(decision="published" if version else "rejected", published=bool(version),
                          version=version, reason=decision["reason"])
            store.complete_claim(claim.claim_id, consumed_by=version or run_id, note=report["decision"])
            if report.get("training_requests"):
                store.mark_training_requests_handled(report["training_requests"], run_id)
            report["wall_time_s"] = round(time.time() - t0, 2)
            report["version_stats"] = store.version_stats()
            report_path = _write_report(run_dir, report, result)
            store.finish_run(run_id, "done", bool(version), version, decision["reason"],
                             {"before": _key(result["before"]), "after": _key(result["after"])}, str(report_path))
            log.info("finetune round %s: %s (%s)", run_id, report["decision"], decision["reason"])
        else:
            report.update(decision="published" if decision["publish"] else "rejected", reason=decision["reason"],
                          published=bool(decision["publish"]))
        if dist is not None:
            final = _broadcast({"version": report.get("version")}, dist)  # everyone leaves after rank 0 published
            report["version"] = final["version"]
        return report
    except Exception as exc:
        if master:
            log.exception("finetune round %s failed", run_id)
            if claim is not None and claim.claim_id:
                try:
                    store.release_claim(claim.claim_id, note=f"failed: {exc}")
                except Exception:
                    log.exception("could not release claim %s", claim.claim_id)
            try:
                store.finish_run(run_id, "failed", False, None, f"{type(exc).__name__}: {exc}", {})
            except Exception:
                pass
            report.update(decision="failed", published=False, reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if own_store:
            store.close()


def resolve_patch_loss_weight(cfg: FinetuneConfig, variant: str) -> float:
    """The round's referent-patch loss weight: the configured one, else that of the variant's training preset (a
    round fine-tunes with the objective its base was trained with: the demo's 20, the official recipe's 0)."""
    if cfg.patch_loss_weight is not None:
        return float(cfg.patch_loss_weight)
    from ssp_sam.train import PRESETS

    preset = next((p for p in PRESETS.values() if p.get("variant") == variant), {})
    return float(preset.get("patch_loss_weight", 0.0))


def _train_and_evaluate(cfg: FinetuneConfig, store, plan: dict, run_dir: Path, report: dict, master: bool) -> dict:
    import torch

    from ssp_sam.evaluate import evaluate_model
    from ssp_sam.train import config_from_preset, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded, parent = load_base(cfg)
    model, tok = loaded.model, loaded.tokenizer
    train_set = rows_to_samples(store, plan["train"])
    held_set = rows_to_samples(store, plan["held"])
    report["parent"] = parent
    t = time.time()
    before = _clean(evaluate_model(model, tok, held_set, batch_size=cfg.eval_batch_size, by_kind=True))
    report["eval_s"] = round(time.time() - t, 2)
    curve = [{"epoch": 0, "heldout_mIoU": before["mIoU"]}]

    def on_epoch_end(record):
        ep = int(record.get("epoch", len(curve)))
        point = {"epoch": ep, "train_loss": record.get("train/total")}
        if cfg.curve_every and (ep % cfg.curve_every == 0 or ep == cfg.epochs):
            point["heldout_mIoU"] = evaluate_model(model, tok, held_set, batch_size=cfg.eval_batch_size,
                                                   by_kind=False, original_resolution=False)["mIoU"]
        curve.append(point)
        return None

    report["patch_loss_weight"] = patch_weight = resolve_patch_loss_weight(cfg, loaded.spec.name)
    tcfg = config_from_preset("finetune", variant=loaded.spec.name, train_data="", val_data="",
                              patch_loss_weight=patch_weight, epochs=cfg.epochs, max_steps=cfg.max_steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, lr_decoder=cfg.lr_decoder,
                              lr_min=min(cfg.lr, cfg.lr_decoder) / 100, warmup_epochs=cfg.warmup_epochs,
                              clip_grad=cfg.clip_grad, aug_translate=cfg.aug_translate,
                              train_sam_encoder=cfg.train_sam_encoder, train_clip=cfg.train_clip,
                              patch_head_fit_steps=cfg.patch_head_fit_steps, seed=cfg.seed,
                              out_dir=str(run_dir / "train"), device=cfg.device,
                              eval_batch_size=cfg.eval_batch_size, threads=cfg.threads)
    t = time.time()
    res = train(tcfg, model=model, tokenizer=tok, train_set=train_set, val_set=None, on_epoch_end=on_epoch_end)
    report["train_s"] = round(time.time() - t, 2)
    report["steps"] = res.steps
    model = res.model if res.model is not None else model
    after = _clean(evaluate_model(model, tok, held_set, batch_size=cfg.eval_batch_size, by_kind=True))
    report.update(before=before, after=after, delta_mIoU_points=round((after["mIoU"] - before["mIoU"]) * 100, 2),
                  curve=curve, history=[_clean(h) for h in res.history])
    return {"before": before, "after": after, "model": model, "tokenizer": tok, "parent": parent,
            "variant": loaded.spec.name}


def _write_report(run_dir: Path, report: dict, result: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "report.json"
    tmp = run_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str, sort_keys=True))
    os.replace(tmp, path)
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
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# watch
# ---------------------------------------------------------------------------------------------------------------------

def watch(cfg: FinetuneConfig, store=None, stop: threading.Event | None = None) -> list[dict]:
    """Run rounds when enough new samples arrived, on a timer, or on START_TRAINING requests."""
    from backend.learning.datastore import open_datastore

    dist, rank, world = _dist()
    own = store is None
    if store is None and rank == 0:
        store = open_datastore(cfg.datastore_url, cfg.model_dir)
    stop = stop or threading.Event()
    reports: list[dict] = []
    last_run = time.time()
    skipped_at = -1  # new-sample count at the last skipped round: wait for more before trying again
    try:
        while not stop.is_set():
            go = None
            if rank == 0:
                n_new = store.count_new_samples()
                requests = store.pending_training_requests()
                due = (time.time() - last_run) / 60.0 >= cfg.every_minutes and n_new > 0
                if n_new != skipped_at and (n_new >= cfg.every_samples or requests or due):
                    go = {"reason": "requested" if requests else ("samples" if n_new >= cfg.every_samples
                                                                   else "timer"), "n_new": n_new}
                elif requests and n_new == skipped_at:
                    # a request with nothing new: answer it with a skipped round so it does not pile up
                    go = {"reason": "requested", "n_new": n_new}
            go = _broadcast(go, dist)
            if go:
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
                continue
            stop.wait(cfg.poll_s)
    finally:
        if own and store is not None:
            store.close()
    return reports


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one round and exit (default)")
    mode.add_argument("--watch", action="store_true", help="keep running rounds as corrections arrive")
    p.add_argument("--force", action="store_true", help="run a round even without new samples")
    d = FinetuneConfig()
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", d.model_dir))
    p.add_argument("--datastore-url", default=os.environ.get("DATASTORE_URL"))
    p.add_argument("--variant", default=os.environ.get("SSP_SAM_VARIANT", d.variant))
    p.add_argument("--base-checkpoint", default=os.environ.get("SSP_SAM_CHECKPOINT"),
                   help="base weights when no version is published yet (default: the packaged demo model)")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("model_dir", "datastore_url", "variant", "base_checkpoint"):
            continue
        opt = "--" + f.name.replace("_", "-")
        if f.name == "heldout_fraction":
            opt = "--heldout"
        typ = {"int": int, "float": float, "str": str, "bool": _bool}.get(str(f.type).split(" ")[0].strip("'"),
                                                                          None)
        if typ is None:  # Optional[...] fields
            typ = int if "int" in str(f.type) else (float if "float" in str(f.type) else str)
        p.add_argument(opt, dest=f.name, type=typ, default=f.default, help=_HELP.get(f.name, f"default {f.default}"))


_HELP = {
    "heldout_fraction": "share of tasks held out by task-id hash, never trained on (default 0.2)",
    "tolerance": "publish when held-out mIoU >= before - tolerance (0..1 scale; default 0.0)",
    "min_new_samples": "a round needs this many new samples (default 1)",
    "min_train": "minimum training samples (default 4)",
    "min_heldout": "minimum held-out samples to validate (default 2)",
    "epochs": "passes over the training samples (default 10)",
    "max_steps": "stop after this many optimiser steps",
    "train_sam_encoder": "true/false: train SAM's image encoder (default: what the variant says; the demo: true, "
                         "the official variants: false, embeddings cached)",
    "train_clip": "true/false: train CLIP (default: what the variant says)",
    "aug_translate": "true/false: random placement of the image in CLIP's padded square (default true, as official)",
    "patch_loss_weight": "weight of the auxiliary referent-patch loss (ssp_sam.losses; default: the variant's training "
                         "preset's, i.e. 20 for the demo, 0 for the official variants)",
    "patch_head_fit_steps": "steps fitting the patch loss's head alone on the start model before the round "
                            "(default 200; 0 = start from a random head)",
    "curve_every": "evaluate held-out mIoU every N epochs for the curve (0: off)",
    "lease_s": "claim lease in seconds, renewed by a heartbeat (default 1800)",
    "every_samples": "--watch: start a round when this many new samples are waiting (default 50)",
    "every_minutes": "--watch: start a round after this many minutes if anything is new (default 60)",
    "poll_s": "--watch: seconds between datastore polls (default 10)",
    "max_rounds": "--watch: stop after this many rounds",
}


def _bool(s: str) -> bool:
    return str(s).lower() in ("1", "true", "yes", "on")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    return FinetuneConfig(**kw)


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.watch:
        watch(cfg)
        return 0
    dist, rank, _ = _dist()
    try:
        rep = run_once(cfg, force=args.force)
    finally:
        if dist is not None:
            dist.destroy_process_group()
    if rank == 0:
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


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune on annotators' corrections; publish only if better",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=_cli)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.learning.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _cli(args)


if __name__ == "__main__":
    sys.exit(main())
