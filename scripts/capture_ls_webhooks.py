#!/usr/bin/env python
"""Capture the real webhook payloads Label Studio 1.23.2 sends, as test fixtures.

Starts LS headless (scripts/labelstudio_headless.py, with the tests' user), a tiny recording ML backend, then
creates, updates, bulk-imports and deletes annotations and presses "Start Training". Each distinct action's first
payload is written to ``tests/fixtures/webhooks/<ACTION>.json`` (the unit tests replay them against /webhook).

    .venv/bin/python scripts/capture_ls_webhooks.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from ssp_sam.data.masks import mask_to_brush_rle  # noqa: E402
from tests.e2e.ls_harness import (LABEL_CONFIG, TOKEN, ensure_ls_venv, free_port, start_label_studio,  # noqa: E402
                                  stop, wait_http)


def recorder():
    app = Flask("recorder")
    received: list = []

    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "Recorder"})

    @app.post("/setup")
    def setup():
        return jsonify({"model_version": "recorder-1"})

    @app.post("/predict")
    def predict():
        tasks = (request.get_json(force=True) or {}).get("tasks") or []
        return jsonify({"results": [{"result": [], "score": 0.0, "model_version": "recorder-1"} for _ in tasks]})

    @app.post("/webhook")
    def webhook():
        received.append(request.get_json(force=True))
        return jsonify({"status": "ok"}), 201

    return app, received


def main() -> int:
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "webhooks"))
    args = ap.parse_args()
    ok, msg = ensure_ls_venv()
    if not ok:
        print(f"cannot create the Label Studio environment: {msg}", file=sys.stderr)
        return 1
    app, received = recorder()
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ml_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc, ls, log = start_label_studio(Path(tmp))
        try:
            wait_http(ls + "/health", proc, 120, log)
            s = requests.Session()
            s.headers["Authorization"] = f"Token {TOKEN}"

            def call(method, path, **kw):
                r = s.request(method, ls + path, timeout=60, **kw)
                assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text[:300]}"
                return r.json() if r.content else None

            pid = call("POST", "/api/projects", json={"title": "capture", "label_config": LABEL_CONFIG})["id"]
            call("POST", f"/api/projects/{pid}/import",
                 json=[{"image": "/data/upload/1/scene.png", "text": "the red circle on the left"}])
            tid = call("GET", f"/api/tasks?project={pid}")["tasks"][0]["id"]
            ml = call("POST", "/api/ml", json={"url": ml_url, "project": pid, "title": "recorder"})
            mask = np.zeros((48, 64), np.uint8)
            mask[10:30, 5:25] = 255
            result = [
                {"id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "manual",
                 "original_width": 64, "original_height": 48, "image_rotation": 0,
                 "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["object"]}},
                {"id": "t1", "from_name": "prompt", "to_name": "image", "type": "textarea", "origin": "manual",
                 "value": {"text": ["the red circle on the left"]}},
            ]
            ann = call("POST", f"/api/tasks/{tid}/annotations",
                       json={"result": result, "was_cancelled": False, "ground_truth": False, "lead_time": 2.5})
            mask[10:30, 5:30] = 255
            result[0]["value"]["rle"] = mask_to_brush_rle(mask)
            call("PATCH", f"/api/annotations/{ann['id']}", json={"result": result, "lead_time": 4.0})
            call("POST", f"/api/ml/{ml['id']}/train")
            call("DELETE", f"/api/annotations/{ann['id']}")
            # bulk: a task imported with an annotation, then every annotation deleted through the Data Manager
            call("POST", f"/api/projects/{pid}/import",
                 json=[{"data": {"image": "/data/upload/1/scene2.png", "text": "the blue square"},
                        "annotations": [{"result": result, "lead_time": 1.0}]}])
            call("POST", f"/api/dm/actions?id=delete_tasks_annotations&project={pid}",
                 json={"selectedItems": {"all": True, "excluded": []}})
            time.sleep(1.0)
        finally:
            stop(proc)
            server.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen = {}
    for payload in received:
        seen.setdefault(payload.get("action"), payload)
    for action, payload in seen.items():
        (out / f"{action}.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print("actions in order:", [p.get("action") for p in received])
    print(f"{len(received)} webhook calls; wrote {sorted(seen)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
