"""Resident memory of a serving worker while its image-embedding cache fills to its bound (``EMBEDDING_CACHE_MB``).

Starts ``ssp-sam serve`` (gunicorn, one worker) with the chosen model and cache bound, then sends interactive
``/predict`` requests, each on a new image (a cold request: its SAM and CLIP features enter the cache), until the
cache has been filled ``--fill`` times over. The worker's VmRSS is sampled every ``--sample-s`` seconds from
``/proc``; the embedding cache's own count (``/metrics``: bytes, items, evictions) is read after every request.
The bound holds when the peak RSS stays within the RSS after warm-up + the cache bound + ``--margin-mb`` (the text
features' cache, bounded at 32 MB, allocator arenas; the media cache's page cache is not RSS).

    python bench/memory.py                                  # demo model, EMBEDDING_CACHE_MB=128, filled twice over
    python bench/memory.py --model ssp-sam-224 --device cuda --cache-mb 512      # on a GPU (bench/gpu.sh)
    python bench/memory.py --smoke                          # tiny model, 4 MB: checks the bench

Writes bench/results/memory.json (``--out``) with the machine, date and command; exits 1 when the bound is exceeded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import exit_on_sigterm, parse_size, write_json  # noqa: E402
from bench.server_latency import TOKEN, encode, photo_like, predict, wait_loaded  # noqa: E402
from tests.local_http import LocalMediaServer  # noqa: E402
from tests.serving.server_process import running_server  # noqa: E402

MB = 2**20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.samples = pid, every, 0.0, []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                value = rss_mb(self.pid)
            except (OSError, RuntimeError):
                return
            self.peak = max(self.peak, value)
            self.samples.append((time.monotonic(), value))
            self.stopped.wait(self.every)


def caches(base: str) -> tuple[dict, dict]:
    """(image-feature cache, text-feature cache) statistics from /metrics."""
    stats = requests.get(base + "/metrics", timeout=30).json()["serving"]["embedding_cache"]
    return stats["image_cache"], stats.get("text_cache") or {}


def run(args) -> dict:
    env = {"SSP_SAM_VARIANT": args.model, "PRELOAD_MODEL": "true", "DEVICE": args.device, "DTYPE": args.dtype,
           "LOG_LEVEL": "WARNING", "EMBEDDING_CACHE_MB": str(args.cache_mb), "GUNICORN_TIMEOUT": "1800"}
    w, h = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp, LocalMediaServer(token=TOKEN) as media, \
            running_server(Path(tmp), LABEL_STUDIO_URL=media.origin, LABEL_STUDIO_API_KEY=TOKEN, **env) as server:
        session = requests.Session()
        wait_loaded(server.base)
        (pid,) = server.worker_pids()
        urls = [media.add_upload(f"warm{i}.png", encode(photo_like(w, h, 10_000 + i), "PNG")) for i in range(3)]
        for i, url in enumerate(urls):                      # warm-up: one-off allocations out of the way
            predict(session, server.base, url, i + 1, f"warm up {i}")
        baseline = rss_mb(pid)
        first, _ = caches(server.base)
        per_item = first["bytes"] / max(1, first["items"])
        target = int(args.fill * args.cache_mb * MB / per_item) + 1
        sampler = Sampler(pid, args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        log = []
        try:
            for i in range(target):
                url = media.add_upload(f"img{i}.png", encode(photo_like(w, h, i), "PNG"))
                predict(session, server.base, url, 1000 + i, f"the object number {i}")
                media.files.clear()                         # the bench keeps no image it no longer serves
                if i % max(1, target // 20) == 0 or i == target - 1:
                    c, t = caches(server.base)
                    log.append({"requests": i + 1, "rss_mb": rss_mb(pid), "cache_mb": c["bytes"] / MB,
                                "items": c["items"], "evictions": c["evictions"],
                                "text_cache_mb": t.get("bytes", 0) / MB})
                    print(f"{i + 1:5d}/{target} requests: RSS {log[-1]['rss_mb']:.0f} MB, cache "
                          f"{log[-1]['cache_mb']:.1f} MB in {c['items']} items, {c['evictions']} evicted; text cache "
                          f"{log[-1]['text_cache_mb']:.1f} MB", flush=True)
        finally:
            sampler.stopped.set()
            sampler.join()
        final, final_text = caches(server.base)
    peak = max(sampler.peak, max(r["rss_mb"] for r in log))
    allowed = baseline + args.cache_mb + args.margin_mb
    return {"model": args.model, "device": args.device, "image_size": args.size, "cache_mb": args.cache_mb,
            "margin_mb": args.margin_mb, "feature_bytes_per_image": per_item, "requests": target,
            "seconds": time.monotonic() - t0, "rss_after_warmup_mb": baseline, "rss_peak_mb": peak,
            "rss_growth_mb": peak - baseline, "allowed_peak_mb": allowed, "within_bound": peak <= allowed,
            "cache_final": final, "text_cache_final": final_text, "cache_never_over_bound": all(r["cache_mb"] <= args.cache_mb for r in log),
            "progress": log}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="SSP_SAM_VARIANT served (random weights unless demo)")
    ap.add_argument("--cache-mb", type=int, default=128, help="EMBEDDING_CACHE_MB")
    ap.add_argument("--fill", type=float, default=2.0, help="fill the cache this many times over")
    ap.add_argument("--margin-mb", type=float, default=300.0, help="allowed RSS growth on top of the cache bound")
    ap.add_argument("--size", default="320x240", help="WxH of the images (features do not depend on it)")
    ap.add_argument("--sample-s", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, EMBEDDING_CACHE_MB=1: checks the bench")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.smoke:
        args.model, args.cache_mb, args.size = "tiny", 1, "64x48"
    r = run(args)
    print(f"\n{r['model']} on {r['device']}, EMBEDDING_CACHE_MB={r['cache_mb']}: {r['requests']} new images "
          f"({r['feature_bytes_per_image'] / 1024:.0f} KiB of features each) in {r['seconds']:.0f} s")
    print("| RSS after warm-up | peak RSS | growth | bound + margin | cache at the end | evictions |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['rss_after_warmup_mb']:.0f} MB | {r['rss_peak_mb']:.0f} MB | {r['rss_growth_mb']:.0f} MB | "
          f"{r['cache_mb']} + {r['margin_mb']:.0f} MB | {r['cache_final']['bytes'] / MB:.1f} MB "
          f"({r['cache_final']['items']} items) | {r['cache_final']['evictions']} |")
    print("within the bound" if r["within_bound"] else "OVER THE BOUND")
    path = write_json(args.out, r)
    print(f"wrote {path}")
    return 0 if r["within_bound"] and r["cache_never_over_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
