"""Load under gunicorn on 127.0.0.1, bounded in count and time: 32 clients send 500 mixed ``/predict`` (the packaged
demo model, on the CPU) and ``ANNOTATION_CREATED`` webhooks to ``ssp-sam serve`` with a real SQLite datastore in a
temporary ``MODEL_DIR`` and task images from a local HTTP server (``LABEL_STUDIO_URL``), while ``/health`` is probed
every 0.25 s and the gunicorn worker's resident memory is sampled.

Asserted: no error (every ``/predict`` 200 with one result per task, every webhook 201, every probe 200; a 503 from
admission control would count as one: ``THREADS=33`` admits the 32 clients), every webhook durably queued (rows in
the datastore), and the worker's peak RSS within its RSS after warm-up + ``EMBEDDING_CACHE_MB`` + RSS_GROWTH_MARGIN_MB.
Latencies are reported (docs/reliability.md through the ``reliability`` fixture), never asserted.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.serving.load import ImageServer, request_plan, run_load, vm_rss_kb
from tests.serving.server_process import running_server

CLIENTS = 32
REQUESTS = 500
IMAGES = 48                  # more images than the embedding cache holds: it evicts, so its bound is exercised
EMBEDDING_CACHE_MB = 4       # about 34 demo-model embeddings (123 KB each)
LOAD_DEADLINE_S = 420.0      # the clients stop taking work after this (unsent requests fail the test)
RSS_GROWTH_MARGIN_MB = 300   # allowed growth over warm-up RSS + the cache bound (measured 216-233 MB: docs/backend.md)
TOKEN = "loadtest0123456789abcdef"


def _warm_up(base: str) -> None:
    """One prediction, so that the model is loaded before the baseline RSS is taken."""
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/img_0.png", "text": "warm up"}}],
            "label_config": __import__("tests.fakes", fromlist=["LABEL_CONFIG"]).LABEL_CONFIG}
    r = requests.post(base + "/predict", json=body, timeout=300)
    assert r.status_code == 200, r.text


def _queued_events(model_dir) -> int:
    from backend.learning.datastore import open_datastore

    store = open_datastore(f"sqlite:///{model_dir}/corrections.db", model_dir=model_dir, migrate=False)
    try:
        events = store.stats()["events"]
        return sum(v for k, v in events.items() if k in ("pending", "processing", "done", "failed", "ignored"))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.reliability
def test_mixed_load_under_gunicorn(tmp_path, reliability):
    plan = request_plan(REQUESTS, IMAGES)
    n_webhooks = sum(1 for endpoint, _, _ in plan if endpoint == "/webhook")
    model_dir = tmp_path / "md"
    with ImageServer(IMAGES) as images, running_server(
            tmp_path, SSP_SAM_VARIANT="demo", THREADS=str(CLIENTS + 1), EMBEDDING_CACHE_MB=str(EMBEDDING_CACHE_MB),
            LABEL_STUDIO_URL=images.url, LABEL_STUDIO_API_KEY=TOKEN, MODEL_DIR=str(model_dir),
            LOG_LEVEL="WARNING") as srv:
        (pid,) = srv.worker_pids()
        _warm_up(srv.base)
        warm_kb = vm_rss_kb(pid)
        result = run_load(srv.base, plan, CLIENTS, pid, LOAD_DEADLINE_S)
        end_kb = vm_rss_kb(pid)
        serving = requests.get(srv.base + "/metrics", timeout=30).json()["serving"]
        log = srv.log_text()
    queued = _queued_events(model_dir)
    cache = serving["embedding_cache"]["image_cache"]
    peak_kb = max(result.rss_kb + [end_kb])
    bound_mb = warm_kb / 1024 + EMBEDDING_CACHE_MB + RSS_GROWTH_MARGIN_MB
    _report(reliability, result, warm_kb, peak_kb, end_kb, cache, queued, n_webhooks, bound_mb)

    assert result.not_sent == 0, f"{result.not_sent} requests not sent within {LOAD_DEADLINE_S} s"
    assert result.errors == [], result.errors[:10]
    assert sum(result.statuses["/predict"].values()) + sum(result.statuses["/webhook"].values()) == REQUESTS
    assert result.statuses["/health"][200] > 0
    assert result.webhooks_created == n_webhooks and queued == n_webhooks, (result.webhooks_created, queued)
    assert serving["counters"].get("rejected_busy", 0) == 0 and serving["counters"].get("task_errors", 0) == 0
    assert cache["bytes"] <= cache["max_bytes"] == EMBEDDING_CACHE_MB * 2**20 and cache["evictions"] > 0
    assert peak_kb / 1024 <= bound_mb, (peak_kb / 1024, bound_mb)
    assert "Traceback" not in log, log[-3000:]


def _report(reliability, result, warm_kb, peak_kb, end_kb, cache, queued, n_webhooks, bound_mb) -> None:
    for endpoint in ("/predict", "/webhook", "/health"):
        n = len(result.latencies[endpoint])
        line = (f"{endpoint}: n={n}, p50 {1000 * result.percentile(endpoint, 0.5):.0f} ms, "
                f"p99 {1000 * result.percentile(endpoint, 0.99):.0f} ms, max "
                f"{1000 * max(result.latencies[endpoint] or [float('nan')]):.0f} ms, "
                f"statuses {dict(result.statuses[endpoint])}")
        print(line)
        reliability("Load under gunicorn", f"{endpoint} latency under load", f"{CLIENTS} clients, {REQUESTS} mixed requests, demo "
                    f"model on the CPU, THREADS={CLIENTS + 1}", line)
    errors = f"{len(result.errors)} errors, {result.not_sent} not sent, in {result.seconds:.0f} s"
    memory = (f"worker VmRSS after warm-up {warm_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB, at the end "
              f"{end_kb / 1024:.0f} MB (growth {(peak_kb - warm_kb) / 1024:.0f} MB); bound {bound_mb:.0f} MB = "
              f"warm-up + EMBEDDING_CACHE_MB {EMBEDDING_CACHE_MB} + margin {RSS_GROWTH_MARGIN_MB}; embedding cache "
              f"{cache['bytes'] / 2**20:.2f} of {cache['max_bytes'] / 2**20:.0f} MB, {cache['evictions']} evictions")
    queue_line = f"{queued} events in the datastore for {n_webhooks} webhooks sent"
    for case, got in (("errors", errors), ("worker memory", memory), ("webhooks durably queued", queue_line)):
        print(case, "->", got)
        reliability("Load under gunicorn", case, f"{CLIENTS} clients, {REQUESTS} requests, {time.strftime('%Y-%m-%d')}", got)
