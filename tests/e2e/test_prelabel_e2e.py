"""``ssp-sam prelabel`` against a real Label Studio 1.23.2: a run killed half way, then resumed under ``torchrun``
with two CPU processes.

A project of 26 tasks: 4 images uploaded to Label Studio, 20 on a local image server, one image the local server does
not have (404) and one upload that does not exist. The local server serves the first few images and then holds every
further request until the test lets it go, so the first run (one process, the default launch, legacy token) is always
caught half way: the test waits until Label Studio holds predictions, then SIGKILLs it. The second run (``torchrun
--standalone --nproc_per_node 2``, a personal access token) must store exactly the missing predictions, shared
between its two ranks: in the end every task with an image holds exactly one prediction of the served model_version,
the two without hold none and are reported in rank 0's merged summary with their reasons, and the stored masks are
those recorded in the corrections datastore.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ssp_sam.data.masks import brush_rle_to_mask
from tests.e2e.ls_harness import (LABEL_CONFIG, require_ls_venv, ROOT, TOKEN, personal_access_token,
                                  start_label_studio, stop, tail, wait_http)
from tests.local_http import LocalServer, send_bytes

pytestmark = pytest.mark.e2e

N_UPLOADED, N_SERVED = 4, 20        # images uploaded to Label Studio / on the local image server
SERVED_BEFORE_HOLD = 6              # local images served before the server holds requests (during the first run)
BATCH = 2


def _scenes(n: int):
    from ssp_sam.data.synthetic import generate_sample

    return [generate_sample(2025, 500 + i) for i in range(n)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class HoldingImageServer(LocalServer):
    """Serves ``/img/<i>.png``; after ``budget`` images it holds each further request until ``release()``."""

    def __init__(self, images: dict[str, bytes], budget: int):
        self.images, self.budget, self.served = images, budget, 0
        self.released = threading.Event()
        self.lock = threading.Lock()
        super().__init__({path: self._answer for path in images})

    def _answer(self, handler) -> None:
        with self.lock:
            self.served += 1
            hold = self.served > self.budget
        if hold:
            self.released.wait(timeout=300)
        send_bytes(handler, self.images[handler.path], content_type="image/png")

    def release(self) -> None:
        self.released.set()


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    require_ls_venv()
    tmp = tmp_path_factory.mktemp("prelabel-e2e")
    proc, url, log = start_label_studio(tmp)
    try:
        wait_http(f"{url}/health", proc, 120, log)
        yield {"url": url, "log": log, "tmp": tmp}
    finally:
        stop(proc)


def _prelabel_cmd(project: int, processes: int) -> list[str]:
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(processes)]
    return launch + ["-m", "backend.cli", "--log-level", "INFO", "prelabel", "--project", str(project),
                     "--batch-size", str(BATCH), "--workers", "2", "--no-progress"]


def _env(ls: str, token: str, model_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    env.update({"LABEL_STUDIO_URL": ls, "LABEL_STUDIO_API_KEY": token, "MODEL_DIR": str(model_dir), "DEVICE": "cpu",
                "MEDIA_ALLOW_PRIVATE_NETWORKS": "127.0.0.1/32", "MEDIA_TIMEOUT_S": "300", "PYTHONUNBUFFERED": "1"})
    return env


def test_prelabel_killed_half_way_then_resumed_under_torchrun_with_two_processes(label_studio, tmp_path):
    ls, t0 = label_studio["url"], time.monotonic()
    s = requests.Session()
    s.headers["Authorization"] = f"Token {TOKEN}"

    def call(method, path, **kw):
        r = s.request(method, ls + path, timeout=60, **kw)
        assert r.status_code in (200, 201), f"{method} {path} -> {r.status_code}: {r.text[:300]}"
        return r.json()

    def predictions() -> list:
        return call("GET", f"/api/predictions?project={pid}")

    scenes = _scenes(N_UPLOADED + N_SERVED)
    pid = call("POST", "/api/projects", json={"title": "prelabel-e2e", "label_config": LABEL_CONFIG})["id"]
    files = [(f"f{i}", (f"scene{i}.png", _png(sc.image), "image/png")) for i, sc in enumerate(scenes[:N_UPLOADED])]
    ids = call("POST", f"/api/projects/{pid}/import?commit_to_project=false", files=files)["file_upload_ids"]
    uploads = ["/data/" + call("GET", f"/api/import/file-upload/{i}")["file"] for i in ids]
    server = HoldingImageServer({f"/img/{i}.png": _png(sc.image) for i, sc in enumerate(scenes)}, SERVED_BEFORE_HOLD)
    with server:
        urls = uploads + [server.url(f"/img/{i}.png") for i in range(N_UPLOADED, N_UPLOADED + N_SERVED)]
        data = [{"image": u, "text": sc.sentence, "scene": i} for i, (u, sc) in enumerate(zip(urls, scenes))]
        data += [{"image": server.url("/img/missing.png"), "text": "the red circle", "scene": -1},
                 {"image": f"/data/upload/{pid}/gone.png", "text": "the blue square", "scene": -2}]
        call("POST", f"/api/projects/{pid}/import", json=data)
        tasks = {t["data"]["scene"]: t["id"] for t in call("GET", f"/api/tasks?project={pid}&page_size=100")["tasks"]}
        assert len(tasks) == len(data) == 26

        # run 1 (one process, legacy token): caught half way by the holding server, then SIGKILLed
        model_dir = tmp_path / "model_dir"
        log1 = tmp_path / "run1.log"
        with open(log1, "wb") as out:
            first = subprocess.Popen(_prelabel_cmd(pid, 1), env=_env(ls, TOKEN, model_dir), cwd=str(ROOT), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(predictions()) < BATCH and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert first.poll() is None, f"the first run ended on its own:\n{tail(log1)}"
            assert len(predictions()) >= BATCH, f"no prediction stored by the first run:\n{tail(log1)}"
        finally:
            first.kill()                     # SIGKILL: no clean-up of any kind
            first.wait(30)
        stored_by_first = predictions()
        server.release()
        by_task = [p["task"] for p in stored_by_first]
        assert len(by_task) == len(set(by_task)), "the first run predicted a task twice"
        # at most the uploaded images and those the server let through can have been predicted: half way at most
        assert BATCH <= len(by_task) <= N_UPLOADED + SERVED_BEFORE_HOLD < len(tasks), by_task
        print(f"first run killed after {len(by_task)} predictions ({time.monotonic() - t0:.1f} s)")

        # run 2 (torchrun, two processes, a personal access token): resumes, stores exactly the rest
        pat = personal_access_token(ls)
        t1 = time.monotonic()
        second = subprocess.run(_prelabel_cmd(pid, 2), env=_env(ls, pat, model_dir), cwd=str(ROOT), capture_output=True,
                                text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        print(f"second run: {time.monotonic() - t1:.1f} s")
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    print(f"summary of the second run: {json.dumps(summary)}")
    assert pat not in second.stdout + second.stderr and TOKEN not in second.stdout + second.stderr

    final = predictions()
    version = summary["model_version"]
    counts = {tid: sum(1 for p in final if p["task"] == tid and p["model_version"] == version)
              for tid in tasks.values()}
    missing = {tasks[-1], tasks[-2]}
    assert {tid: n for tid, n in counts.items() if tid not in missing} == {tasks[i]: 1 for i in range(24)}
    assert counts[tasks[-1]] == counts[tasks[-2]] == 0 and len(final) == 24
    assert {p["model_version"] for p in stored_by_first} == {version}
    assert (summary["tasks"], summary["skipped"], summary["done"]) == (26, len(by_task), 24 - len(by_task))
    assert (summary["failed"], summary["remaining"], summary["ranks"]) == (2, 2, 2)
    # both ranks worked on their share of what was left (dealt out in id order)
    plans = re.findall(rf"rank (\d)/2: 26 task\(s\) in project {pid}, (\d+) already predicted by \S+, (\d+) to "
                       r"predict here", second.stderr)
    left = sorted(set(tasks.values()) - set(by_task))
    assert sorted((int(r), int(k), int(n)) for r, k, n in plans) == [
        (rank, len(by_task), len(left[rank::2])) for rank in (0, 1)], second.stderr[-3000:]
    reasons = {f["task"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == missing
    assert reasons[tasks[-1]] == f"cannot download the image of task {tasks[-1]}"     # not the LS host: coarse
    assert "gone.png" in reasons[tasks[-2]] and "HTTP 40" in reasons[tasks[-2]]       # the LS host: its detail

    # the stored masks are at the images' natural size and are the masks recorded in the corrections datastore (the
    # ones a correction is scored against); that they are the model's own: tests/test_prelabel.py (prelabel stores what
    # /predict answers) and tests/e2e/test_label_studio_e2e.py (/predict answers the bare model's masks)
    from backend.learning.datastore import open_datastore

    store = open_datastore(None, model_dir=model_dir)
    try:
        for i in range(24):
            tid = tasks[i]
            if tid in by_task:                 # stored by the killed run: its record may not have been written
                continue
            (p,) = [p for p in final if p["task"] == tid]
            h, w = scenes[i].image.shape[:2]
            mask = np.zeros((h, w), bool)
            for r in p["result"]:
                if r["type"] == "brushlabels":
                    assert (r["original_width"], r["original_height"]) == (w, h)
                    mask |= brush_rle_to_mask(r["value"]["rle"], h, w)
                else:
                    assert r["type"] == "textarea" and r["value"]["text"] == [scenes[i].sentence]
            recorded = store.find_prediction(tid, version, scenes[i].sentence)
            assert recorded is not None and np.array_equal(store.prediction_mask(recorded), mask), tid
    finally:
        store.close()
    print(f"prelabel e2e: {time.monotonic() - t0:.1f} s; LS log {label_studio['log']}")
