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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.labelstudio.brush import region_mask  # noqa: E402
from ssp_sam.metrics import MetricAccumulator, iou  # noqa: E402
from backend.learning.finetune import add_round_arguments, config_from_args, is_heldout, run_once  # noqa: E402
from bench.common import machine, portable, write_json  # noqa: E402
from ssp_sam.io import write_text_atomic  # noqa: E402
from tests.fakes import wait_until_idle  # noqa: E402
from tests.local_http import LocalMediaServer  # noqa: E402
from tests.payloads import TEST_LABEL_CONFIG, annotation_event  # noqa: E402

log = logging.getLogger("bench.learn_from_corrections")
TOKEN = "bench-legacy-token-0123456789"
PROJECT = 1


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
    """Metrics of the served masks against the truth (plain IoU: an empty answer to an empty truth scores 1)."""
    acc = MetricAccumulator()
    for i in ids:
        gt = truth[i].astype(bool)
        acc.add(np.zeros_like(gt) if preds.get(i) is None else preds[i], gt, threshold=1)
    m = acc.compute()
    return {k: m[k] for k in ("mIoU", "oIoU", "Pr@0.90")} | {"n": int(m["n"])}


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


def parse_args(argv=None) -> argparse.Namespace:
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
    return ap.parse_args(argv)


def scene_config(args):
    """Novel-domain scenes. By default every sentence refers to something ("none" kind left out); --none-share adds
    no-target sentences, which the annotator submits without a region (no-target samples)."""
    from ssp_sam.data.synthetic import SyntheticConfig

    weights = {"attr": 0.40, "abs_pos": 0.18, "rel_pos": 0.12, "ordinal": 0.10, "multi": 0.20}
    weights = {k: v * (1 - args.none_share) for k, v in weights.items()}
    if args.none_share > 0:
        weights["none"] = args.none_share
    sizes = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    return SyntheticConfig(domain="novel", kind_weights=weights, **sizes)


def build_project(args, media: LocalMediaServer) -> tuple[list[dict], dict[int, np.ndarray]]:
    """The Label Studio project: one uploaded image and sentence per task (served by ``media``), and the truth."""
    from ssp_sam.data.synthetic import SyntheticDataset

    data = SyntheticDataset(args.n, seed=args.data_seed, config=scene_config(args))
    tasks, truth = [], {}
    for i in range(args.n):
        s = data[i]
        url = media.add_upload(f"novel_{i:04d}.png", _png(s.image), project=PROJECT)
        tasks.append({"id": 1000 + i, "project": PROJECT, "data": {"image": url, "text": s.sentence}})
        truth[1000 + i] = s.mask
    return tasks, truth


def backend_env(args, fcfg, model_dir: Path, media: LocalMediaServer) -> dict:
    env = {"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": media.origin, "LABEL_STUDIO_API_KEY": TOKEN,
           "SSP_SAM_VARIANT": fcfg.model.variant, "LOG_LEVEL": "WARNING", "RELOAD_INTERVAL_S": "0.5"}
    if fcfg.model.checkpoint:
        env["SSP_SAM_CHECKPOINT"] = fcfg.model.checkpoint
    if args.datastore_url:
        env["DATASTORE_URL"] = args.datastore_url
    if args.ignore_empty:
        env["EMPTY_ANNOTATION_IS_NO_TARGET"] = "false"
    return env


def annotate(pred: np.ndarray | None, gt: np.ndarray, accept_iou: float) -> tuple[str, np.ndarray | None]:
    """The simulated annotator: (region origin, submitted mask)."""
    if not gt.any():              # nothing matches: submitted without a region (the predicted one deleted, if any)
        return "empty", None
    if pred is not None and pred.any():
        return ("prediction", pred) if iou(pred, gt) >= accept_iou else ("prediction-changed", gt)
    return "manual", gt


def submit_corrections(client, tasks: list[dict], preds: dict, truth: dict, base_version: str,
                       accept_iou: float) -> tuple[dict, list[float]]:
    """Every task annotated and posted as Label Studio's ``ANNOTATION_CREATED`` webhook; (origins, latencies)."""
    origins = {"prediction": 0, "prediction-changed": 0, "manual": 0, "empty": 0}
    lat = []
    for k, task in enumerate(tasks):
        origin, submitted = annotate(preds.get(task["id"]), truth[task["id"]].astype(bool), accept_iou)
        origins[origin] += 1
        payload = annotation_event("ANNOTATION_CREATED", 50_000 + k, task["id"], PROJECT, task["data"]["image"],
                                   task["data"]["text"], submitted, origin=origin, region_id=f"reg{k}",
                                   completed_by=7, lead_time=5.0 + (k % 13), model_version=base_version,
                                   parent_prediction=90_000 + k)
        payload["task"]["data"] = dict(task["data"])
        t0 = time.perf_counter()
        r = client.post("/webhook", json=payload)
        lat.append(time.perf_counter() - t0)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"/webhook: {r.status_code} {r.get_data(as_text=True)[:300]}")
    return origins, lat


def wait_for_samples(store, result: dict) -> None:
    t = time.time()
    if not wait_until_idle(store, timeout=600):
        raise RuntimeError(f"the correction worker did not drain the inbox: {store.stats()['events']}")
    result["ingest_s"] = round(time.time() - t, 2)
    st = store.stats()
    result["inbox"] = {k: st["events"][k] for k in ("done", "failed", "pending")}
    result["samples"] = st["samples"]
    log.info("ingested %d samples in %.1f s (events %s)", st["samples"]["active"], result["ingest_s"], result["inbox"])
    if st["events"]["failed"]:
        raise RuntimeError(f"failed events: {st['events']['failed_recent'][:3]}")


def finetune_round(fcfg, store, model_dir: Path, out: Path, result: dict) -> dict:
    """``run_once`` as ``ssp-sam finetune`` runs it; its report and curve are copied beside ``out``."""
    rep = run_once(dataclasses.replace(fcfg, model_dir=str(model_dir)), store=store)
    if rep.get("decision") == "skipped":
        raise SystemExit(f"the fine-tuning round was skipped: {rep.get('reason')}")
    result["finetune"] = {k: rep.get(k) for k in ("run_id", "decision", "reason", "version", "n_train", "n_heldout",
                                                   "train_s", "eval_s", "steps", "delta_mIoU_points", "curve")}
    keys = ("mIoU", "oIoU", "Pr@0.90", "N-acc", "n", "n_empty")
    result["heldout_before"] = {k: rep["before"].get(k) for k in keys}
    result["heldout_after"] = {k: rep["after"].get(k) for k in keys}
    run_dir = model_dir / "runs" / rep["run_id"]
    result["report"] = str(run_dir / "report.json")
    write_text_atomic(out.with_name(out.stem + "_report.json"),
                      json.dumps(portable(json.loads((run_dir / "report.json").read_text())), indent=2))
    if (run_dir / "curve.png").exists():
        shutil.copyfile(run_dir / "curve.png", out.with_name(out.stem + "_curve.png"))
    return rep


def served_after_reload(rt, client, tasks: list[dict], truth: dict, held_ids: list[int], result: dict) -> None:
    """The backend hot-reloads the published version; ``/predict`` again on the held-out tasks."""
    rt.manager.check_for_update(force=True)
    rt.manager.wait_for_reload(timeout=120)
    held = set(held_ids)
    preds, version, _ = predict_masks(client, [t for t in tasks if t["id"] in held])
    result["served_version_after"] = version
    result["served_after"] = served_miou(preds, truth, held_ids)


def play_project(args, fcfg, model_dir: Path, out: Path, result: dict) -> dict:
    """Steps 1-5 of the module docstring, through the real backend; returns the round's report."""
    from backend.config import BackendConfig
    from backend.serving.app import create_app

    with LocalMediaServer(token=TOKEN) as media:
        tasks, truth = build_project(args, media)
        held_ids = [t["id"] for t in tasks if is_heldout(t["id"], fcfg.heldout_fraction, PROJECT)]
        result["n_heldout_tasks"] = len(held_ids)
        app = create_app(BackendConfig.from_env(backend_env(args, fcfg, model_dir, media)))
        client, rt = app.test_client(), app.extensions["ssp_sam"]
        try:
            t = time.time()
            preds, base_version, _ = predict_masks(client, tasks)
            result["predict_s_per_task"] = round((time.time() - t) / len(tasks), 3)
            result["base_version"] = base_version
            result["served_before"] = served_miou(preds, truth, held_ids)
            log.info("/predict on %d tasks: %.1f s; served held-out mIoU %.2f", len(tasks), time.time() - t,
                     100 * result["served_before"]["mIoU"])
            origins, lat = submit_corrections(client, tasks, preds, truth, base_version, args.accept_iou)
            result["origins"] = origins
            result["webhook_latency_ms"] = {"p50": round(1000 * _pct(lat, 50), 2),
                                            "p95": round(1000 * _pct(lat, 95), 2),
                                            "max": round(1000 * max(lat), 2), "n": len(lat)}
            store = rt.store()
            wait_for_samples(store, result)
            rep = finetune_round(fcfg, store, model_dir, out, result)
            if rep.get("decision") == "published" and not args.no_served_eval:
                served_after_reload(rt, client, tasks, truth, held_ids, result)
            result["version_stats"] = store.version_stats()
        finally:
            rt.stop()
    return rep


def main(argv=None) -> int:
    args = parse_args(argv)
    fcfg = dataclasses.replace(config_from_args(args, env={}), datastore_url=args.datastore_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("backend.serving.app", "backend.serving.model", "werkzeug", "urllib3", "label_studio_sdk"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fcfg.train.threads:
        import torch

        torch.set_num_threads(fcfg.train.threads)

    t_all = time.time()
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="learn-from-corrections-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "n": args.n, "seed": args.data_seed, "heldout_fraction": fcfg.heldout_fraction,
                    "model_dir": str(model_dir), "args": vars(args)}
    rep = play_project(args, fcfg, model_dir, out, result)
    if args.fresh_eval > 0:
        from ssp_sam.data.synthetic import SyntheticDataset

        fresh = SyntheticDataset(args.fresh_eval, seed=args.data_seed + 100_000, config=scene_config(args))
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
