"""A bounded load generator for the real server on 127.0.0.1: ``clients`` threads share a fixed list of mixed
``/predict`` and ``/webhook`` requests (shaped as Label Studio sends them), a prober asks ``/health`` meanwhile, and a
sampler reads the gunicorn worker's resident memory from ``/proc/<pid>/status``. Task images come from
:class:`ImageServer`, a local HTTP server standing in for Label Studio's upload storage. Nothing here leaves
127.0.0.1; every loop stops at its count or at the deadline, whichever comes first.
"""

from __future__ import annotations

import io
import queue
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import requests
from PIL import Image, ImageDraw

from tests.fakes import LABEL_CONFIG
from tests.payloads import annotation_event

SENTENCES = ["the red circle", "the thing on the left", "a blue square", "the object in the middle", "nothing here"]


# ---------------------------------------------------------------------- task images
def scene(k: int, size=(320, 240)) -> bytes:
    """A distinct PNG per ``k`` (its own background and shapes): every image has its own embedding."""
    rng = random.Random(k)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 60), rng.randrange(size[1] - 60)
        box = (x, y, x + rng.randrange(20, 60), y + rng.randrange(20, 60))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    """``/storage-data/uploaded/?filepath=upload/1/img_<k>.png`` (Label Studio's upload proxy) on 127.0.0.1."""

    def __init__(self, n_images: int, size=(320, 240)):
        self.size = size
        self.files = {f"img_{k}.png": scene(k, size) for k in range(n_images)}
        self.hits = 0
        files, outer = self.files, self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):                                   # noqa: N802 (http.server's name)
                name = parse_qs(urlparse(self.path).query).get("filepath", [self.path])[0].rsplit("/", 1)[-1]
                body = files.get(name)
                outer.hits += 1
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------- the requests
def image_url(k: int) -> str:
    return f"/data/upload/1/img_{k}.png"


def predict_request(rng: random.Random, n_images: int) -> tuple[str, dict, int]:
    tasks = [{"id": rng.randrange(1, 10**6), "project": 1,
              "data": {"image": image_url(rng.randrange(n_images)), "text": rng.choice(SENTENCES)}}
             for _ in range(rng.choice([1, 1, 2]))]
    body = {"tasks": tasks, "project": "1.1700000000", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": None}}
    return "/predict", body, len(tasks)


def webhook_request(rng: random.Random, n_images: int, annotation_id: int, size=(320, 240)) -> tuple[str, dict, int]:
    w, h = size
    mask = np.zeros((h, w), bool)
    x, y = rng.randrange(w // 2), rng.randrange(h // 2)
    mask[y:y + h // 4, x:x + w // 4] = True
    payload = annotation_event("ANNOTATION_CREATED", annotation_id, rng.randrange(1, 10**6), 1,
                               image_url(rng.randrange(n_images)), rng.choice(SENTENCES), mask,
                               region_id=f"r{annotation_id}")
    return "/webhook", payload, 0


def request_plan(n_requests: int, n_images: int, seed: int = 0) -> list[tuple[str, dict, int]]:
    """A fixed, shuffled mix: half ``/predict`` (1-2 tasks each), half ``ANNOTATION_CREATED`` webhooks."""
    rng = random.Random(seed)
    plan = [predict_request(rng, n_images) if i % 2 == 0 else webhook_request(rng, n_images, 1000 + i)
            for i in range(n_requests)]
    rng.shuffle(plan)
    return plan


# ---------------------------------------------------------------------- running it
@dataclass
class LoadResult:
    latencies: dict = field(default_factory=lambda: defaultdict(list))     # endpoint -> seconds
    statuses: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    errors: list = field(default_factory=list)                             # (endpoint, what)
    webhooks_created: int = 0
    rss_kb: list = field(default_factory=list)
    seconds: float = 0.0
    not_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, endpoint: str, seconds: float, status, error: str | None = None) -> None:
        with self.lock:
            self.latencies[endpoint].append(seconds)
            self.statuses[endpoint][status] += 1
            if error:
                self.errors.append((endpoint, error))
            if endpoint == "/webhook" and status == 201:
                self.webhooks_created += 1

    def percentile(self, endpoint: str, q: float) -> float:
        values = sorted(self.latencies[endpoint])
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def _check_answer(endpoint: str, r: requests.Response, n_tasks: int) -> str | None:
    if endpoint == "/predict":
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        results = r.json().get("results")
        if not isinstance(results, list) or len(results) != n_tasks:
            return f"{len(results or [])} results for {n_tasks} tasks"
        return None
    return None if r.status_code == 201 else f"{r.status_code} {r.text[:200]}"


def _client(base: str, work: "queue.Queue", result: LoadResult, deadline: float, timeout_s: float) -> None:
    with requests.Session() as session:
        while time.monotonic() < deadline:
            try:
                endpoint, body, n_tasks = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            try:
                r = session.post(base + endpoint, json=body, timeout=timeout_s)
                result.record(endpoint, time.perf_counter() - t0, r.status_code, _check_answer(endpoint, r, n_tasks))
            except requests.RequestException as exc:
                result.record(endpoint, time.perf_counter() - t0, type(exc).__name__, f"{type(exc).__name__}: {exc}")


def _probe_health(base: str, result: LoadResult, stop: threading.Event, every_s: float, timeout_s: float) -> None:
    with requests.Session() as session:
        while not stop.wait(every_s):
            t0 = time.perf_counter()
            try:
                r = session.get(base + "/health", timeout=timeout_s)
                result.record("/health", time.perf_counter() - t0, r.status_code,
                              None if r.status_code == 200 else f"{r.status_code}")
            except requests.RequestException as exc:
                result.record("/health", time.perf_counter() - t0, type(exc).__name__, type(exc).__name__)


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _sample_rss(pid: int, result: LoadResult, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            result.rss_kb.append(vm_rss_kb(pid))
        except (OSError, RuntimeError):
            return


def run_load(base: str, plan: list, clients: int, worker_pid: int, deadline_s: float, probe_every_s: float = 0.25,
             request_timeout_s: float = 120.0) -> LoadResult:
    """Send every request of ``plan`` from ``clients`` threads (unless ``deadline_s`` passes first), probing
    ``/health`` and sampling the worker's RSS meanwhile."""
    work: queue.Queue = queue.Queue()
    for item in plan:
        work.put(item)
    result, stop = LoadResult(), threading.Event()
    deadline = time.monotonic() + deadline_s
    side = [threading.Thread(target=_probe_health, args=(base, result, stop, probe_every_s, 30.0), daemon=True),
            threading.Thread(target=_sample_rss, args=(worker_pid, result, stop, 0.1), daemon=True)]
    workers = [threading.Thread(target=_client, args=(base, work, result, deadline, request_timeout_s), daemon=True)
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in side + workers:
        t.start()
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()) + request_timeout_s)
    result.seconds = time.perf_counter() - t0
    stop.set()
    for t in side:
        t.join(35)
    result.not_sent = work.qsize()
    return result
