"""Latency through the real HTTP server, stage by stage: a new image with its first sentence (cold) and new sentences
on a cached image (warm), at several image sizes, for server variants compared side by side.

Each variant is a running ``ssp-sam serve`` (gunicorn, one worker, ``SERVER_TIMING=true``) on 127.0.0.1 with the
chosen model (default ``ssp-sam-224-vit-b``) with random weights, the same in every server: a bundle of
``build_model(model, seed=0)`` written once to a temporary folder and served as ``SSP_SAM_CHECKPOINT`` (timings of the
model do not depend on weight values, but those of the RLE and the JSON depend on the masks). Task images come from a local HTTP server standing in for Label
Studio (uploads with a legacy token). Requests are Label Studio's interactive ones: one task, the sentence in the
prompt TextArea of ``params.context``. The variants' servers run at the same time and take turns image by image, so
that the load of a shared machine falls on all of them alike.

Per request: the client's wall time and the server's stages from its ``Server-Timing`` header (``ssp_sam.timing``):
fetch, decode, key, preprocess, sam_encoder, clip_vision, clip_text, decoder, upsample, rle, record, json. "model" is
sam_encoder + clip_vision + clip_text + decoder; "overhead" is everything else the client waited for (client time -
model). With ``--prewarm`` the first sentence on a new image is also timed after an interactive call without a
sentence let the server compute the image's embedding in the background.

Usage:
    python bench/server_latency.py                                   # ViT-B, 1024x1024 PNG + 4000x3000 JPEG, SDPA on/off
    python bench/server_latency.py --variants sdpa=SDPA=true eager=SDPA=false compiled=TORCH_COMPILE=true
    python bench/server_latency.py --repo /path/to/other/checkout    # serve another version's code (no stages
                                                                     # unless it has SERVER_TIMING)
    python bench/server_latency.py --smoke                           # tiny model, small images: checks the bench

Writes bench/results/server_latency.json (``--out``) with the machine, date and command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import exit_on_sigterm, parse_size, write_json  # noqa: E402
from ssp_sam.timing import MODEL_STAGES, STAGES  # noqa: E402
from tests.local_http import LocalMediaServer  # noqa: E402
from tests.payloads import TEST_LABEL_CONFIG  # noqa: E402
from tests.serving.server_process import running_server  # noqa: E402

TOKEN = "bench-legacy-token-0123456789"
SENTENCES = ["the red car on the left", "the person in the middle", "a small dog next to the bench",
             "the tallest building", "the blue umbrella", "the second window from the right",
             "the tree behind the fence", "the cup on the table"]


# ---------------------------------------------------------------------- inputs
def photo_like(w: int, h: int, seed: int) -> np.ndarray:
    """A picture with a photograph's statistics for the codecs: smooth gradients, a few filled shapes, mild noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * xx / w * 6 + b * yy / h * 6 + d * 3)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(w, h)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=VAR=value,VAR=value`` (or ``name`` alone: the server's defaults)."""
    name, _, rest = text.partition("=")
    env = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        env[k.strip()] = v.strip()
    return name, env


def rotated(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def sentence(task_id: int, k: int) -> str:
    """A sentence no server has seen (the text features are cached by sentence)."""
    return f"{SENTENCES[k % len(SENTENCES)]} number {task_id}"


# ---------------------------------------------------------------------- requests
def server_timing(header: str | None) -> dict[str, float]:
    """``Server-Timing`` -> {stage: ms}."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "dur" and name:
                out[name] = float(v)
    return out


def interactive_body(image_url: str, task_id: int, sentence: str | None) -> dict:
    result = [] if sentence is None else [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                           "value": {"text": [sentence]}, "origin": "manual"}]
    return {"tasks": [{"id": task_id, "project": 1, "data": {"image": image_url}}], "project": "1.1700000000",
            "label_config": TEST_LABEL_CONFIG, "params": {"context": {"result": result}}}


def predict(session: requests.Session, base: str, image_url: str, task_id: int, sentence: str | None,
            pause: float = 0.0) -> dict:
    """One interactive /predict. ``client_ms``: until the whole answer has arrived (its parsing is the client's
    business); ``pause`` before it: an annotator's think time, which also lets the server finish what it does after
    an answer (recording the mask) before the next request on the same connection."""
    time.sleep(pause)
    t0 = time.perf_counter()
    r = session.post(base + "/predict", json=interactive_body(image_url, task_id, sentence), timeout=900)
    r.content                                                   # noqa: B018 - read the whole body
    client_ms = 1000 * (time.perf_counter() - t0)
    r.raise_for_status()
    body = r.json()
    first = body["results"][0]
    if "error" in first:
        raise RuntimeError(f"the server failed the task: {first['error']}")
    stages = server_timing(r.headers.get("Server-Timing"))
    server_ms = stages.pop("total", None)
    model_ms = sum(stages.get(s, 0.0) for s in MODEL_STAGES)
    return {"client_ms": client_ms, "server_ms": server_ms, "stages": stages, "model_ms": model_ms if stages else None,
            "unstaged_ms": server_ms - sum(stages.values()) if server_ms is not None else None,
            "overhead_ms": client_ms - model_ms if stages else None,
            "regions": sum(x["type"] == "brushlabels" for x in first.get("result", [])),
            "rle_ints": sum(len(x["value"]["rle"]) for x in first.get("result", []) if x["type"] == "brushlabels")}


def wait_loaded(base: str, timeout: float = 1800.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = requests.get(base + "/health", timeout=5).json()
        if h.get("model_loaded"):
            return
        if h.get("last_error"):
            raise RuntimeError(f"the model did not load: {h['last_error']}")
        time.sleep(0.5)
    raise TimeoutError("the model did not load in time")


def counters(base: str) -> dict:
    return requests.get(base + "/metrics", timeout=30).json()["serving"].get("counters", {})


def wait_prewarmed(base: str, before: int, timeout: float = 900.0) -> float:
    """Seconds until ``prewarm_computed`` or ``prewarm_cached`` passes ``before``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        c = counters(base)
        if c.get("prewarm_computed", 0) + c.get("prewarm_cached", 0) > before:
            return time.perf_counter() - t0
        if c.get("prewarm_errors"):
            raise RuntimeError("the prewarm failed (see the server log)")
        time.sleep(0.05)
    raise TimeoutError("the prewarm did not finish in time")


# ---------------------------------------------------------------------- summary
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(rows: list[dict]) -> dict:
    stages = sorted({s for r in rows for s in r["stages"]}, key=lambda s: (STAGES + ("total",)).index(s)
                    if s in STAGES + ("total",) else 99)
    out = {"n": len(rows), "client_ms": median([r["client_ms"] for r in rows]),
           "server_ms": median([r["server_ms"] for r in rows]), "unstaged_ms": median([r["unstaged_ms"] for r in rows]),
           "client_ms_min": min(r["client_ms"] for r in rows), "client_ms_max": max(r["client_ms"] for r in rows),
           "model_ms": median([r["model_ms"] for r in rows]), "overhead_ms": median([r["overhead_ms"] for r in rows]),
           "stages_ms": {s: median([r["stages"].get(s, 0.0) for r in rows]) for s in stages},
           "client_ms_all": [round(r["client_ms"], 1) for r in rows],
           "rle_ints": median([r["rle_ints"] for r in rows])}
    if out["model_ms"]:
        out["overhead_share"] = out["overhead_ms"] / out["model_ms"]
        no_rle = [r["overhead_ms"] - r["stages"].get("rle", 0.0) for r in rows if r["overhead_ms"] is not None]
        out["overhead_without_rle_share"] = median(no_rle) / out["model_ms"]
    return out


def fmt(v, digits=0) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def print_tables(results: dict) -> None:
    for size, entry in results.items():
        by_variant = entry["variants"]
        print(f"\n### {size} ({entry['format']})\n")
        names = list(by_variant)
        stage_names = [s for s in STAGES if any(s in by_variant[v][k]["stages_ms"] for v in names
                                                   for k in ("cold", "warm") if k in by_variant[v])]
        cols = [f"{v} {k}" for v in names for k in ("cold", "warm") if k in by_variant[v]]
        print("| stage (median ms) | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        cells = [(v, k) for v in names for k in ("cold", "warm") if k in by_variant[v]]
        for s in stage_names:
            print(f"| {s} | " + " | ".join(fmt(by_variant[v][k]["stages_ms"].get(s), 1) for v, k in cells) + " |")
        for label, key, d in (("app, outside the stages", "unstaged_ms", 1), ("model", "model_ms", 1),
                              ("overhead (client - model)", "overhead_ms", 1), ("app total", "server_ms", 1),
                              ("client total", "client_ms", 1)):
            print(f"| **{label}** | " + " | ".join(fmt(by_variant[v][k][key], d) for v, k in cells) + " |")
        print("| RLE length (ints) | " + " | ".join(fmt(by_variant[v][k]["rle_ints"]) for v, k in cells) + " |")
        print("| overhead / model | " + " | ".join(
            fmt(100 * by_variant[v][k]["overhead_share"], 1) + " %" if by_variant[v][k].get("overhead_share")
            is not None else "" for v, k in cells) + " |")
        print("| overhead without rle / model | " + " | ".join(
            fmt(100 * by_variant[v][k]["overhead_without_rle_share"], 1) + " %"
            if by_variant[v][k].get("overhead_without_rle_share") is not None else "" for v, k in cells) + " |")
        print()
        for v in names:
            r = by_variant[v]
            line = f"{v}: cold/warm = {r['cold']['client_ms'] / r['warm']['client_ms']:.1f}x" if "warm" in r else v
            if "prewarmed" in r:
                line += (f"; first sentence after a prewarm {r['prewarmed']['client_ms']:.0f} ms "
                         f"(the empty call answered in {r['prewarm_call']['client_ms']:.0f} ms, the embedding was "
                         f"ready {r['prewarm_ready_s']:.1f} s later)")
            print(line)


# ---------------------------------------------------------------------- run
def random_bundle(model: str, folder: Path) -> Path:
    """A bundle of ``build_model(model, seed=0)`` with every part (served as SSP_SAM_CHECKPOINT by every variant)."""
    from ssp_sam.build import build_model
    from ssp_sam.checkpoints import save_bundle
    from ssp_sam.tokenizer import load_tokenizer

    net = build_model(model, seed=0)
    tokenizer = None if net.spec.tokenizer == "clip-bpe" else load_tokenizer(net.spec)
    return save_bundle(net, tokenizer, folder / f"{model}-seed0.pt", meta={"version": f"{model}-seed0"})


def run(args) -> dict:
    sizes = [parse_size(s) for s in args.sizes]
    variants = [(*parse_variant(v), args.repo) for v in args.variants]
    if args.base_repo:
        variants.insert(0, ("base", {}, args.base_repo))
    base_env = {"SSP_SAM_VARIANT": args.model, "SERVER_TIMING": "true", "PRELOAD_MODEL": "true",
                "DEVICE": args.device, "DTYPE": args.dtype, "LOG_LEVEL": "WARNING",
                "EMBEDDING_CACHE_MB": str(args.cache_mb), "GUNICORN_TIMEOUT": "1800"}
    results: dict = {}
    if args.threads:
        base_env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="server-latency-") as tmp, \
            LocalMediaServer(token=TOKEN) as media, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        base_env["SSP_SAM_CHECKPOINT"] = str(random_bundle(args.model, tmp))
        servers = {}
        for name, env, repo in variants:
            folder = tmp / name
            folder.mkdir()
            servers[name] = stack.enter_context(running_server(
                folder, root=Path(repo), **{**base_env, "LABEL_STUDIO_URL": media.origin,
                                            "LABEL_STUDIO_API_KEY": TOKEN, **env}))
        session = requests.Session()
        warm_url = media.add_upload("warmup.png", encode(photo_like(64, 48, 999), "PNG"))
        for name, server in servers.items():
            t0 = time.perf_counter()
            wait_loaded(server.base)
            predict(session, server.base, warm_url, 1, "warm up")            # one-off costs out of the way
            print(f"{name}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        task_id = 100
        for w, h in sizes:
            size = f"{w}x{h}"
            fmt_ = "PNG" if w * h <= args.png_up_to_mp * 1e6 else "JPEG"
            rows: dict = {name: {"cold": [], "warm": []} for name in servers}
            urls = [media.add_upload(f"{size}-{i}.{fmt_.lower()}", encode(photo_like(w, h, i), fmt_))
                    for i in range(args.images)]
            for i, url in enumerate(urls):
                # the servers take turns request by request (in a rotating order), so that a burst of load on the
                # machine falls on all of them
                ids = {}
                for name in rotated(list(servers), i):
                    task_id += 1
                    ids[name] = task_id
                    rows[name]["cold"].append(predict(session, servers[name].base, url, task_id,
                                                      sentence(task_id, 0), args.pause))
                for k in range(args.warm):
                    for name in rotated(list(servers), i + k + 1):
                        rows[name]["warm"].append(predict(session, servers[name].base, url, ids[name],
                                                          sentence(ids[name], k + 1), args.pause))
                for name in servers:
                    print(f"{size} image {i} {name}: cold {rows[name]['cold'][-1]['client_ms']:.0f} ms, warm "
                          f"{median([r['client_ms'] for r in rows[name]['warm'][-args.warm:]]):.0f} ms", flush=True)
            results[size] = {"format": fmt_, "variants": {name: {k: summarise(v) for k, v in r.items() if v}
                                                          for name, r in rows.items()}}
            if args.prewarm:
                url = media.add_upload(f"{size}-prewarm.{fmt_.lower()}", encode(photo_like(w, h, 777), fmt_))
                for name in servers:
                    if name == "base":                  # another checkout: it may have no prewarm
                        continue
                    base = servers[name].base
                    task_id += 1
                    before = counters(base)
                    done = before.get("prewarm_computed", 0) + before.get("prewarm_cached", 0)
                    call = predict(session, base, url, task_id, None, args.pause)
                    ready = wait_prewarmed(base, done)
                    first = predict(session, base, url, task_id, sentence(task_id, 0), args.pause)
                    results[size]["variants"][name].update(prewarm_call=summarise([call]), prewarm_ready_s=ready,
                                               prewarmed=summarise([first]))
        for name, server in servers.items():
            results.setdefault("_server_metrics", {})[name] = requests.get(
                server.base + "/metrics", timeout=30).json()["serving"].get("stages")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ssp-sam-224-vit-b", help="SSP_SAM_VARIANT served (random weights)")
    ap.add_argument("--sizes", nargs="+", default=["1024x1024", "4000x3000"], help="WxH of the task images")
    ap.add_argument("--variants", nargs="+", default=["sdpa=SDPA=true", "eager=SDPA=false"],
                    help="servers compared side by side: name=VAR=value,VAR=value (environment of each)")
    ap.add_argument("--images", type=int, default=2, help="new images per size (one cold request each)")
    ap.add_argument("--warm", type=int, default=4, help="new sentences per image after the first (warm requests)")
    ap.add_argument("--prewarm", action="store_true", help="also time a first sentence after a prewarm")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds before each request (think time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (torch's threads)")
    ap.add_argument("--cache-mb", type=int, default=512, help="EMBEDDING_CACHE_MB of the servers")
    ap.add_argument("--png-up-to-mp", type=float, default=2.0, help="PNG images up to this many megapixels, JPEG above")
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose server is run (default: this one)")
    ap.add_argument("--base-repo", default=None,
                    help="also run a variant 'base' served from this checkout (e.g. the previous version)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_latency.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, 96x64 and 320x240 images, 1 image, 2 warm")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.smoke:
        args.model, args.sizes, args.images, args.warm = "tiny", ["96x64", "320x240"], 1, 2
    results = run(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain"], cwd=args.repo, capture_output=True, text=True).stdout.strip():
        commit += "+changes"
    print_tables({k: v for k, v in results.items() if not k.startswith("_")})
    path = write_json(args.out, {"model": args.model, "device": args.device, "dtype": args.dtype,
                                 "served_commit": commit, "variants": args.variants,
                                 "base_repo": args.base_repo, "images": args.images,
                                 "warm_per_image": args.warm, "pause_s": args.pause, "threads": args.threads,
                                 "weights": f"build_model({args.model!r}, seed=0)", "results": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
