"""Recovery after a crash: a killed correction worker's events and a killed trainer's claim come back at once (not
after their lease), a live worker keeps its leases, and a trainer killed mid-round loses nothing, consumes nothing
twice, leaves no half-written version, and the next round starts cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend.learning import versions
from backend.learning.corrections import CorrectionWorker, WorkerConfig
from backend.learning.datastore import open_datastore
from backend.learning.leases import HOST, is_dead_local_owner, new_owner_id
from tests.fakes import png_bytes
from tests.payloads import annotation_event

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_owner_ids_tell_dead_local_processes():
    me = new_owner_id("worker")
    assert me.split(":")[:3] == ["worker", HOST, str(os.getpid())] and not is_dead_local_owner(me)
    assert is_dead_local_owner(f"worker:{HOST}:{_dead_pid()}:abc123")
    assert not is_dead_local_owner(f"worker:another-host:{_dead_pid()}:abc123")   # another host: its lease decides
    assert not is_dead_local_owner("my-trainer") and not is_dead_local_owner(None)


def test_events_of_a_killed_worker_come_back_at_once(db, reliability):
    store = db.open()
    ids = [store.enqueue_event("START_TRAINING", {"action": "START_TRAINING", "project": {"id": i}}) for i in (1, 2)]
    dead = f"worker:{HOST}:{_dead_pid()}:dead00"
    assert len(store.claim_events(dead, limit=10, lease_seconds=3600)) == 2   # held for an hour by a dead process
    worker = CorrectionWorker(store, lambda url, task: b"", WorkerConfig(poll_interval_s=0.05))
    assert worker.process_pending() == 0                                     # still leased
    assert worker.recover_dead_workers() == 2
    assert worker.drain() == 2
    assert [store.get_event(i)["status"] for i in ids] == ["done", "done"]
    assert len(store.pending_training_requests()) == 2
    reliability("Crash recovery", "a correction worker killed while it holds events",
                "2 events leased for 3600 s to a process that no longer exists; a new worker starts",
                "the new worker hands both back to the inbox at start and processes them, without waiting for the lease")


def test_a_live_worker_keeps_its_lease_while_an_event_takes_long(db, tmp_path, reliability):
    store, other = db.open(), db.open()
    release = threading.Event()

    def slow_fetch(url, task):
        assert release.wait(30)
        return png_bytes(40, 30)

    import numpy as np

    mask = np.zeros((30, 40), bool)
    mask[5:20, 5:25] = True
    eid = store.enqueue_event("ANNOTATION_CREATED", annotation_event(
        "ANNOTATION_CREATED", 7, 70, 1, "/data/upload/1/a.png", "the red box", mask))
    slow = CorrectionWorker(store, slow_fetch, WorkerConfig(lease_s=0.6, poll_interval_s=0.05)).start()
    try:
        deadline = time.monotonic() + 30
        while store.get_event(eid)["status"] != "processing" and time.monotonic() < deadline:
            time.sleep(0.05)
        rival = CorrectionWorker(other, slow_fetch, WorkerConfig(lease_s=0.6))
        takes = []
        for _ in range(15):                       # 15 tries over 1.5 s, more than twice the lease
            takes.append(rival.process_pending())
            time.sleep(0.1)
        release.set()
        while store.get_event(eid)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        release.set()
        slow.stop()
    event = store.get_event(eid)
    assert takes == [0] * 15 and event["status"] == "done" and event["attempts"] == 1
    assert len(store.list_samples()) == 1
    reliability("Crash recovery", "a live worker whose event takes longer than its lease",
                "an event whose image download blocks 1.5 s with a 0.6 s lease; a second worker polls 15 times",
                "the heartbeat renews the lease: the second worker never takes it; processed once (1 attempt)")


# ---------------------------------------------------------------------------------------------------------------------
# the trainer killed mid-round
# ---------------------------------------------------------------------------------------------------------------------

def _queue_corrections(store, n: int) -> None:
    from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

    data = SyntheticDataset(n, seed=3, config=SyntheticConfig(domain="novel", min_size=48, max_size=64,
                                                              kind_weights={"attr": 1.0}))
    images = {}
    for i in range(n):
        s = data[i]
        url = f"/data/upload/1/t{i}.png"
        images[url] = s.image
        store.enqueue_event("ANNOTATION_CREATED", annotation_event(
            "ANNOTATION_CREATED", 900 + i, 100 + i, 1, url, s.sentence, s.mask))

    def fetch(url, task):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(images[url]).save(buf, format="PNG")
        return buf.getvalue()

    CorrectionWorker(store, fetch).drain()
    assert len(store.list_samples()) == n


def _finetune_cmd(model_dir: Path, base: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "backend.cli", "--log-level", "WARNING", "finetune", "--once", "--model-dir",
            str(model_dir), "--variant", "tiny", "--base-checkpoint", base, "--device", "cpu", "--epochs",
            str(epochs), "--heldout", "0.3", "--min-train", "2", "--min-heldout", "1", "--tolerance", "1",
            "--batch-size", "2", "--curve-every", "0", "--threads", "1"]


def test_trainer_killed_mid_round_loses_nothing_and_the_next_round_starts_cleanly(tmp_path, tiny_bundle,
                                                                                  reliability):
    model_dir = tmp_path / "md"
    store = open_datastore(None, model_dir)
    _queue_corrections(store, 10)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_finetune_cmd(model_dir, tiny_bundle, epochs=10_000), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            running = [r for r in store.list_runs() if r["status"] == "running"]
            if running and store.active_claims():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the trainer ended before it could be killed"
        time.sleep(1.0)                           # well into training (its 10 000 epochs would take hours)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (claim,) = store.active_claims()
    assert claim["n_samples"] == 10 and store.count_new_samples() == 0        # held by the dead trainer's claim
    assert versions.read_current(model_dir) is None and not versions.pointer_path(model_dir).exists()
    assert all(s["consumed_at"] is None for s in store.list_samples())

    done = subprocess.run(_finetune_cmd(model_dir, tiny_bundle, epochs=1), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    published = versions.read_current(model_dir)
    assert published is not None and Path(published.path).is_file()
    samples = store.list_samples()
    assert {s["consumed_by"] for s in samples} == {published.version}          # each consumed once, by this round
    runs = {r["status"]: r for r in store.list_runs()}
    assert runs["failed"]["reason"] == "the trainer process died" and runs["done"]["version"] == published.version
    from ssp_sam.build import ModelConfig, load_model

    assert load_model(ModelConfig(variant="tiny", checkpoint=published.path, device="cpu")).meta["version"] == \
        published.version
    reliability("Crash recovery", "the trainer killed (SIGKILL) in the middle of a round",
                "ssp-sam finetune --once holding 10 new samples, killed while training; then ssp-sam finetune --once",
                "nothing published by the killed round, its 10 samples unconsumed; the next round releases the dead "
                "claim at once, trains on all 10, publishes a loadable version, each sample consumed once by it; "
                "the killed run recorded as failed")
    store.close()
