"""Proof that the backend learns from annotators' corrections.

Starts from the demo model, takes synthetic ``domain="novel"`` scenes it never saw (new shapes, colours, texture), and
plays a Label Studio project through the real backend:

1. a tiny local HTTP server plays Label Studio's media endpoints (``/data/upload/1/<file>`` and
   ``/storage-data/uploaded/?filepath=...``, token required), so images go through ``backend.labelstudio.media`` and the SDK;
2. ``POST /predict`` for every task (the Flask app's test client; each prediction is recorded in the datastore);
3. a simulated annotator accepts a prediction unchanged when its IoU with the truth is >= ``--accept-iou``
   (region ``origin: prediction``), otherwise fixes it (``prediction-changed``) or draws it (``manual``), and
   ``POST /webhook`` sends ``ANNOTATION_CREATED`` shaped exactly as Label Studio sends it (webhook latency measured);
4. the backend's background worker turns the events into samples; ``backend.learning.finetune.run_once`` fine-tunes, compares
   held-out mIoU before/after and publishes;
5. the backend hot-reloads the published version and ``/predict`` is scored again on the held-out tasks;
6. the base and the published model are scored on ``--fresh-eval`` fresh novel scenes (same sentence mix, another
   seed): the held-out tasks are only ~20 % of ``--n``, and their mIoU swings by several points between draws.

Prints tables and writes ``--out`` (JSON). Usage:
    python bench/learn_from_corrections.py --n 200          # the fine-tuning defaults of `ssp-sam finetune`
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.labelstudio.brush import region_mask  # noqa: E402
from ssp_sam.metrics import iou  # noqa: E402
from backend.learning.finetune import add_round_arguments, config_from_args, is_heldout, run_once  # noqa: E402
from bench.common import machine, portable, write_json  # noqa: E402
from ssp_sam.io import write_text_atomic  # noqa: E402
from tests.fakes import wait_until_idle  # noqa: E402
from tests.payloads import TEST_LABEL_CONFIG, annotation_event  # noqa: E402

log = logging.getLogger("bench.learn_from_corrections")
TOKEN = "bench-legacy-token-0123456789"
PROJECT = 1


# ---------------------------------------------------------------------------------------------------------------------
# a stand-in for Label Studio's media endpoints
# ---------------------------------------------------------------------------------------------------------------------

class MediaServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.requests += 1
                if self.headers.get("Authorization") not in (f"Token {TOKEN}", f"Bearer {TOKEN}"):
                    self.send_response(401)
                    self.end_headers()
                    return
                parts = urlsplit(self.path)
                name = None
                if parts.path.startswith("/data/upload/"):
                    name = parts.path[len("/data/"):]
                elif parts.path.rstrip("/") == "/storage-data/uploaded":
                    name = parse_qs(parts.query).get("filepath", [None])[0]
                data = srv.files.get(name or "")
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------------------------

def predict_masks(client, tasks: list[dict]) -> tuple[dict[int, np.ndarray | None], str, list[float]]:
    """``POST /predict`` one task at a time (as LS does for a batch of 1); returns masks by task id."""
    out, version, lat = {}, None, []
    for t in tasks:
        body = {"tasks": [t], "label_config": TEST_LABEL_CONFIG, "project": f"{PROJECT}.1700000000",
                "params": {"context": None}}
        t0 = time.perf_counter()
        r = client.post("/predict", json=body)
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"/predict failed: {r.status_code} {r.get_data(as_text=True)[:500]}")
        res = r.get_json()
        version = res.get("model_version") or version
        pred = (res.get("results") or [{}])[0]
        version = pred.get("model_version") or version
        brush = [x for x in pred.get("result", []) if x.get("type") == "brushlabels"]
        if brush:
            b = brush[0]
            out[t["id"]] = region_mask(b["value"], b["original_width"], b["original_height"])
        else:
            out[t["id"]] = None
    return out, version, lat


def served_miou(preds: dict, truth: dict, ids: list[int]) -> dict:
    ious, inter, union = [], 0, 0
    for i in ids:
        gt = truth[i].astype(bool)
        p = preds.get(i)
        p = np.zeros_like(gt) if p is None else p
        ious.append(iou(p, gt))
        inter += int(np.logical_and(p, gt).sum())
        union += int(np.logical_or(p, gt).sum())
    return {"mIoU": float(np.mean(ious)) if ious else float("nan"), "oIoU": inter / union if union else float("nan"),
            "Pr@0.90": float(np.mean([x >= 0.9 for x in ious])) if ious else float("nan"), "n": len(ious)}


def fresh_eval(scenes, variant: str, parent_path: str | None, published_path: str | None) -> dict:
    """Metrics of the model the round started from (``parent_path``; None = the packaged demo) and of the published
    version (if any) on scenes never sent as corrections."""
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.evaluate import evaluate_model

    out = {"n": len(scenes)}
    models = {"before": ModelConfig(variant=variant, checkpoint=parent_path, device="cpu")}
    if published_path:
        models["after"] = ModelConfig(variant=variant, checkpoint=published_path, device="cpu")
    for name, mcfg in models.items():
        loaded = load_model(mcfg)
        m = evaluate_model(loaded.model, loaded.tokenizer, scenes, original_resolution=False)
        out[name] = {k: v for k, v in m.items() if "/" not in k or k.endswith("/mIoU")}
    if "after" in out:
        out["delta_mIoU_points"] = round(100 * (out["after"]["mIoU"] - out["before"]["mIoU"]), 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="corrections to send")
    ap.add_argument("--seed", dest="data_seed", type=int, default=2026,
                    help="draw of the corrections (and of the fresh scenes); the round's training seed is --train-seed")
    ap.add_argument("--train-seed", dest="seed", type=int, default=argparse.SUPPRESS,
                    help="the round's training seed (default: the finetune preset's, 3407)")
    add_round_arguments(ap, skip=("seed", "model_dir", "datastore_url"))   # the options of `ssp-sam finetune`
    ap.set_defaults(min_heldout=5)
    ap.add_argument("--none-share", type=float, default=0.0,
                    help="share of no-target sentences, submitted without a region (default 0)")
    ap.add_argument("--ignore-empty", action="store_true",
                    help="EMPTY_ANNOTATION_IS_NO_TARGET=false: annotations without a region add no sample")
    ap.add_argument("--accept-iou", type=float, default=0.95)
    ap.add_argument("--min-size", type=int, default=None, help="synthetic image side range (default: generator's)")
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--model-dir", default=None, help="default: a temporary folder")
    ap.add_argument("--datastore-url", default=None)
    ap.add_argument("--no-served-eval", action="store_true", help="skip scoring /predict after the reload")
    ap.add_argument("--fresh-eval", type=int, default=300,
                    help="also score the base and the published model on this many fresh novel-domain scenes (same "
                         "sentence mix, another seed, never sent as corrections): a larger, less noisy test than "
                         "the held-out tasks (0: off)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learn_from_corrections.json"))
    args = ap.parse_args(argv)
    fcfg = dataclasses.replace(config_from_args(args, env={}), datastore_url=args.datastore_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("backend.serving.app", "backend.serving.model", "werkzeug", "urllib3", "label_studio_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fcfg.train.threads:
        import torch

        torch.set_num_threads(fcfg.train.threads)

    from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

    t_all = time.time()
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="learn-from-corrections-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # by default every sentence refers to something ("none" kind left out); --none-share adds no-target sentences,
    # which the annotator submits without a region (kept as no-target samples, EMPTY_ANNOTATION_IS_NO_TARGET)
    weights = {"attr": 0.40, "abs_pos": 0.18, "rel_pos": 0.12, "ordinal": 0.10, "multi": 0.20}
    weights = {k: v * (1 - args.none_share) for k, v in weights.items()}
    if args.none_share > 0:
        weights["none"] = args.none_share
    syn_kw = {"domain": "novel", "kind_weights": weights}
    if args.min_size:
        syn_kw["min_size"] = args.min_size
    if args.max_size:
        syn_kw["max_size"] = args.max_size
    data = SyntheticDataset(args.n, seed=args.data_seed, config=SyntheticConfig(**syn_kw))
    files, tasks, truth = {}, [], {}
    for i in range(args.n):
        s = data[i]
        tid = 1000 + i
        name = f"upload/{PROJECT}/novel_{i:04d}.png"
        files[name] = _png(s.image)
        tasks.append({"id": tid, "project": PROJECT, "data": {"image": f"/data/{name}", "text": s.sentence}})
        truth[tid] = s.mask
    held_ids = [t["id"] for t in tasks if is_heldout(t["id"], fcfg.heldout_fraction, PROJECT)]

    env = {"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": None, "LABEL_STUDIO_API_KEY": TOKEN,
           "SSP_SAM_VARIANT": fcfg.model.variant, "LOG_LEVEL": "WARNING", "RELOAD_INTERVAL_S": "0.5"}
    if fcfg.model.checkpoint:
        env["SSP_SAM_CHECKPOINT"] = fcfg.model.checkpoint
    if args.datastore_url:
        env["DATASTORE_URL"] = args.datastore_url
    if args.ignore_empty:
        env["EMPTY_ANNOTATION_IS_NO_TARGET"] = "false"
    result: dict = {"machine": machine(), "n": args.n, "seed": args.data_seed, "heldout_fraction": fcfg.heldout_fraction,
                    "n_heldout_tasks": len(held_ids), "model_dir": str(model_dir), "args": vars(args)}

    with MediaServer(files) as media:
        env["LABEL_STUDIO_URL"] = media.url
        from backend.serving.app import create_app
        from backend.config import BackendConfig

        config = BackendConfig.from_env({k: v for k, v in env.items() if v is not None})
        app = create_app(config)
        client = app.test_client()
        rt = app.extensions["ssp_sam"]

        # ---- 1. pre-annotations --------------------------------------------------------------------------------
        t = time.time()
        preds, base_version, pred_lat = predict_masks(client, tasks)
        result["predict_s_per_task"] = round((time.time() - t) / len(tasks), 3)
        result["base_version"] = base_version
        result["served_before"] = served_miou(preds, truth, held_ids)
        log.info("/predict on %d tasks: %.1f s; served held-out mIoU %.2f", len(tasks), time.time() - t,
                 100 * result["served_before"]["mIoU"])

        # ---- 2. the annotator submits; LS posts webhooks ----------------------------------------------------------
        origins = {"prediction": 0, "prediction-changed": 0, "manual": 0, "empty": 0}
        lat = []
        for k, task in enumerate(tasks):
            tid = task["id"]
            p = preds.get(tid)
            gt = truth[tid].astype(bool)
            if not gt.any():  # nothing matches: submitted without a region (the predicted one deleted, if any)
                origin, submitted = "empty", None
            elif p is not None and p.any() and iou(p, gt) >= args.accept_iou:
                origin, submitted = "prediction", p
            elif p is not None and p.any():
                origin, submitted = "prediction-changed", gt
            else:
                origin, submitted = "manual", gt
            origins[origin] += 1
            payload = annotation_event("ANNOTATION_CREATED", 50_000 + k, tid, PROJECT, task["data"]["image"],
                                       task["data"]["text"], submitted, origin=origin, region_id=f"reg{k}",
                                       completed_by=7, lead_time=5.0 + (k % 13), model_version=base_version,
                                       parent_prediction=90_000 + k)
            payload["task"]["data"] = dict(task["data"])
            t0 = time.perf_counter()
            r = client.post("/webhook", json=payload)
            lat.append(time.perf_counter() - t0)
            if r.status_code not in (200, 201):
                raise RuntimeError(f"/webhook: {r.status_code} {r.get_data(as_text=True)[:300]}")
        result["webhook_latency_ms"] = {"p50": round(1000 * _pct(lat, 50), 2), "p95": round(1000 * _pct(lat, 95), 2),
                                        "max": round(1000 * max(lat), 2), "n": len(lat)}
        result["origins"] = origins
        store = rt.store()
        t = time.time()
        if not wait_until_idle(store, timeout=600):
            raise RuntimeError(f"the correction worker did not drain the inbox: {store.stats()['events']}")
        result["ingest_s"] = round(time.time() - t, 2)
        st = store.stats()
        result["inbox"] = {k: st["events"][k] for k in ("done", "failed", "pending")}
        result["samples"] = st["samples"]
        log.info("ingested %d samples in %.1f s (events %s)", st["samples"]["active"], result["ingest_s"],
                 result["inbox"])
        if st["events"]["failed"]:
            raise RuntimeError(f"failed events: {st['events']['failed_recent'][:3]}")

        # ---- 3. fine-tune and publish ----------------------------------------------------------------------------
        fcfg = dataclasses.replace(fcfg, model_dir=str(model_dir))
        rep = run_once(fcfg, store=store)
        if rep.get("decision") == "skipped":
            raise SystemExit(f"the fine-tuning round was skipped: {rep.get('reason')}")
        result["finetune"] = {k: rep.get(k) for k in ("run_id", "decision", "reason", "version", "n_train",
                                                       "n_heldout", "train_s", "eval_s", "steps",
                                                       "delta_mIoU_points", "curve")}
        keys = ("mIoU", "oIoU", "Pr@0.90", "N-acc", "n", "n_empty")
        result["heldout_before"] = {k: rep["before"].get(k) for k in keys}
        result["heldout_after"] = {k: rep["after"].get(k) for k in keys}
        result["report"] = str(model_dir / "runs" / rep["run_id"] / "report.json")
        # keep the trainer's report and curve beside --out (the model dir may be temporary)
        run_dir = model_dir / "runs" / rep["run_id"]
        write_text_atomic(out.with_name(out.stem + "_report.json"),
                          json.dumps(portable(json.loads((run_dir / "report.json").read_text())), indent=2))
        if (run_dir / "curve.png").exists():
            shutil.copyfile(run_dir / "curve.png", out.with_name(out.stem + "_curve.png"))

        # ---- 4. the backend reloads the published version; /predict again on held-out tasks ---------------------
        if rep.get("decision") == "published" and not args.no_served_eval:
            mgr = rt.manager
            mgr.check_for_update(force=True)
            if hasattr(mgr, "wait_for_reload"):
                mgr.wait_for_reload(timeout=120)
            held_tasks = [t for t in tasks if t["id"] in set(held_ids)]
            preds2, v2, _ = predict_masks(client, held_tasks)
            result["served_version_after"] = v2
            result["served_after"] = served_miou(preds2, truth, held_ids)
        result["version_stats"] = store.version_stats()
        rt.stop()
    if args.fresh_eval > 0:
        fresh = SyntheticDataset(args.fresh_eval, seed=args.data_seed + 100_000, config=SyntheticConfig(**syn_kw))
        # "before" is the model the round fine-tuned from: the base, or the version already published in --model-dir
        result["fresh"] = fresh_eval(fresh, fcfg.model.variant, rep["parent"]["path"],
                                     rep.get("version_path") if rep.get("decision") == "published" else None)
    result["total_s"] = round(time.time() - t_all, 1)
    print_tables(result)
    write_json(out, result)
    print(f"\nwritten {out}")
    return 0


def print_tables(r: dict) -> None:
    def row(name, m):
        if not m:
            return f"{name:<44}{'-':>8}"
        return (f"{name:<44}{100 * m['mIoU']:>8.2f}{100 * m['oIoU']:>8.2f}{100 * (m.get('Pr@0.90') or 0):>8.2f}"
                f"{int(m['n']):>6}")

    print(f"\nLearning from {r['n']} corrections on the novel synthetic domain "
          f"({r['machine']['cores']} cores, {r['machine']['device']}, torch {r['machine']['torch']})")
    print(f"{'held-out tasks (never trained on)':<44}{'mIoU':>8}{'oIoU':>8}{'Pr@0.9':>8}{'n':>6}")
    print(row(f"trainer eval, before ({r.get('base_version')})", r.get("heldout_before")))
    print(row(f"trainer eval, after ({r['finetune'].get('version') or 'not published'})", r.get("heldout_after")))
    print(row("served /predict, before", r.get("served_before")))
    if r.get("served_after"):
        print(row(f"served /predict, after ({r.get('served_version_after')})", r.get("served_after")))
    fresh = r.get("fresh")
    if fresh:
        print(row(f"fresh novel scenes, before ({fresh['n']})", fresh["before"]))
        if "after" in fresh:
            print(row(f"fresh novel scenes, after ({fresh['n']})", fresh["after"]))
    b, a = r.get("heldout_before"), r.get("heldout_after")
    if b and a:
        print(f"delta held-out mIoU: {100 * (a['mIoU'] - b['mIoU']):+.2f} points; decision: "
              f"{r['finetune']['decision']} ({r['finetune']['reason']})")
        if a.get("n_empty"):
            print(f"held-out no-target tasks: {int(a['n_empty'])}, N-acc {100 * b['N-acc']:.1f} -> "
                  f"{100 * a['N-acc']:.1f}")
    print(f"\nwebhook latency (Flask test client, enqueue + commit): p50 {r['webhook_latency_ms']['p50']} ms, "
          f"p95 {r['webhook_latency_ms']['p95']} ms, max {r['webhook_latency_ms']['max']} ms")
    print(f"origins: {r['origins']}; ingest {r['ingest_s']} s; training {r['finetune'].get('train_s')} s "
          f"({r['finetune'].get('steps')} steps); total {r['total_s']} s")
    print("\nper-version acceptance (version_stats):")
    print(f"{'version':<40}{'preds':>7}{'regions':>8}{'accepted':>9}{'changed':>8}{'manual':>7}{'meanIoU':>8}"
          f"{'queued':>7}")
    for v, s in r.get("version_stats", {}).items():
        iou = "-" if s.get("mean_iou") is None else f"{s['mean_iou']:.3f}"
        print(f"{v:<40}{s['predictions']:>7}{s['regions']:>8}{s['accepted']:>9}{s['changed']:>8}{s['manual']:>7}"
              f"{iou:>8}{s['queued']:>7}")


if __name__ == "__main__":
    sys.exit(main())
