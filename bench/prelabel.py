"""Throughput of ``ssp-sam prelabel`` against a real Label Studio 1.23.2, side by side with the bare predictor's
``predict_batch`` on the same images (the demo model, CPU unless --device says otherwise), and what storing the
predictions costs (one bulk ``projects.import_predictions`` per batch vs one ``predictions.create`` per task).

Rows, all on the same N synthetic scenes (one sentence each):
  bare predict_batch             decoded images in memory, the predictor alone (no cache: each image is new)
  + PNG decode + brush RLE        the same, plus what any pre-labeling must add around the model (PNG bytes -> array,
                                 mask -> Label Studio brush region)
  ssp-sam prelabel (P process)   the real command in a subprocess against Label Studio: downloads through the media
                                 fetcher, the model, regions, the datastore record, bulk uploads. Its pipeline time
                                 (first download to last upload) and the whole command's time (start-up, listing and
                                 model load included) are both reported.

Usage: python bench/prelabel.py [--n 200] [--size 640x480] [--batch-size 8] [--workers 4] [--processes 1 2]
                                [--rounds 3] [--threads 1] [--device cpu|cuda] [--stand-in]
Needs .venv-ls (scripts/ensure_label_studio.sh); starts Label Studio headless on a free port
(scripts/labelstudio_headless.py, through tests/e2e/ls_harness.py) and stops it. With --stand-in it starts nothing
but a static file server: the images come from it (plain http URLs, as from a bucket) and the predictions go to an
in-memory stand-in of the SDK's client (tests/fakes.FakeLabelStudio), so the numbers are the pipeline's own, without
Label Studio's work on the same machine (and it runs where Label Studio is not installed, e.g. a GPU machine). Prints a
table; writes JSON with the machine, the date and the command (bench/results/prelabel.json by default).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backend.labelstudio.brush import mask_region  # noqa: E402
from bench.common import machine, parse_size, write_json  # noqa: E402
from ssp_sam.images import load_image  # noqa: E402
from scripts.labelstudio_headless import free_port, start_process  # noqa: E402
from tests.e2e.ls_harness import (LABEL_CONFIG, TOKEN, ensure_ls_venv, start_label_studio, stop,  # noqa: E402
                                  wait_http)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="tasks (synthetic scenes)")
    ap.add_argument("--size", default=None, help="resize every scene to WxH (nearest), e.g. 640x480; default: native")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="prelabel's download/decode threads per process")
    ap.add_argument("--processes", type=int, nargs="+", default=[1], help="prelabel runs: processes (torchrun if >1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of the bare predictor and of each prelabel process (OMP_NUM_THREADS); 1 "
                         "keeps a shared machine's numbers stable (see docs/performance.md)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (bare, prelabel runs); the table shows medians")
    ap.add_argument("--stand-in", action="store_true",
                    help="no Label Studio: a static file server and a stand-in client")
    ap.add_argument("--no-datastore", action="store_true",
                    help="with --stand-in: prelabel records no prediction in the corrections datastore (what the "
                         "records cost; the command itself always records them)")
    ap.add_argument("--stand-in-worker", default=None, help=argparse.SUPPRESS)    # one prelabel process of --stand-in
    ap.add_argument("--out", default=None, help="default bench/results/prelabel.json (prelabel_stand_in.json)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# the scenes
# ---------------------------------------------------------------------------------------------------------------------

def scenes(n: int, seed: int, size: str | None) -> list[tuple[bytes, str]]:
    """``n`` synthetic scenes as (PNG bytes, sentence)."""
    from ssp_sam.data.synthetic import generate_sample

    out = []
    for i in range(n):
        s = generate_sample(seed, i)
        image = Image.fromarray(s.image)
        if size:
            w, h = parse_size(size)
            image = image.resize((w, h), Image.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((buf.getvalue(), s.sentence))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the bare predictor
# ---------------------------------------------------------------------------------------------------------------------

def bare(data: list[tuple[bytes, str]], batch: int, device: str) -> dict:
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.predictor import SSPSAMPredictor

    predictor = SSPSAMPredictor(load_model(ModelConfig(variant="demo", device=device)), cache_bytes=0)
    images = [load_image(png) for png, _ in data]
    pairs = [(im, s) for im, (_, s) in zip(images, data)]
    for p in predictor.predict_batch(pairs[:batch], batch_size=batch):   # warm-up (one-off costs, imports included)
        mask_region(p.mask, from_name="tag", to_name="image", label="object", score=p.score)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(pairs), batch):
        predictor.predict_batch(pairs[i:i + batch], batch_size=batch)
    model_s, model_cpu_s = time.perf_counter() - t, time.process_time() - cpu

    t = time.perf_counter()
    decode_s = rle_s = 0.0
    for i in range(0, len(data), batch):
        t0 = time.perf_counter()
        chunk = [(load_image(png), s) for png, s in data[i:i + batch]]
        decode_s += time.perf_counter() - t0
        preds = predictor.predict_batch(chunk, batch_size=batch)
        t0 = time.perf_counter()
        for p in preds:
            if p.mask.any():
                mask_region(p.mask, from_name="tag", to_name="image", label="object", score=p.score)
        rle_s += time.perf_counter() - t0
    full_s = time.perf_counter() - t
    return {"model_s": model_s, "model_cpu_s": model_cpu_s, "with_decode_rle_s": full_s, "decode_s": decode_s,
            "rle_s": rle_s, "version": predictor.version}


# ---------------------------------------------------------------------------------------------------------------------
# Label Studio
# ---------------------------------------------------------------------------------------------------------------------

class Studio:
    def __init__(self, url: str, pid: int, work: Path):
        from label_studio_sdk.client import LabelStudio

        self.url, self.pid, self.work = url, pid, work     # pid: Label Studio's process, for its CPU time
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {TOKEN}"
        self.client = LabelStudio(base_url=url, api_key=TOKEN)

    def project(self, title: str, data: list[tuple[bytes, str]]) -> int:
        """A project whose tasks are ``data``'s images, uploaded to Label Studio, with their sentences."""
        pid = self.client.projects.create(title=title, label_config=LABEL_CONFIG).id
        urls = []
        for start in range(0, len(data), 50):
            files = [(f"f{i}", (f"scene{i}.png", png, "image/png"))
                     for i, (png, _) in enumerate(data[start:start + 50], start)]
            r = self.http.post(f"{self.url}/api/projects/{pid}/import", params={"commit_to_project": "false"},
                               files=files, timeout=300)
            r.raise_for_status()
            urls += ["/data/" + self.client.files.get(id=i).file for i in r.json()["file_upload_ids"]]
        self.client.projects.import_tasks(id=pid, request=[{"image": u, "text": s} for u, (_, s) in zip(urls, data)])
        return pid

    def task_ids(self, pid: int) -> list[int]:
        return sorted(t.id for t in self.client.tasks.list(project=pid, include="id"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prelabel_run(studio: Studio, pid: int, processes: int, args) -> dict:
    cmd = _launch(processes) + ["-m", "backend.cli", "--log-level", "WARNING", "prelabel", "--project", str(pid),
                                "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    env.update({"LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": TOKEN, "DEVICE": args.device,
                "MODEL_DIR": str(studio.work / f"model_dir_{pid}"), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": str(args.threads)})
    return _timed(cmd, env, studio.pid)


def _launch(processes: int) -> list[str]:
    return [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(processes)]


class StandIn:
    """Images from a static file server (``python -m http.server``, its own process); each prelabel process gets an
    in-memory stand-in of the SDK client holding the tasks (``--stand-in-worker``)."""

    def __init__(self, work: Path, data: list[tuple[bytes, str]]):
        self.work = work
        folder = work / "images"
        folder.mkdir()
        for i, (png, _) in enumerate(data):
            (folder / f"{i}.png").write_bytes(png)
        port = free_port()
        self.server = start_process([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                                     "--directory", str(folder)], dict(os.environ), work, work / "http.log")
        self.url, self.pid = f"http://127.0.0.1:{port}", self.server.pid
        wait_http(f"{self.url}/0.png", self.server, 30, work / "http.log")
        self.projects = 0

    def close(self) -> None:
        stop(self.server)

    def project(self, title: str, data: list[tuple[bytes, str]]) -> Path:
        self.projects += 1
        path = self.work / f"project{self.projects}"
        path.mkdir()
        tasks = {i + 1: {"image": f"{self.url}/{i}.png", "text": sentence} for i, (_, sentence) in enumerate(data)}
        (path / "tasks.json").write_text(json.dumps(tasks))
        return path

    def run(self, project: Path, processes: int, args) -> dict:
        cmd = _launch(processes) + [str(Path(__file__).resolve()), "--stand-in-worker", str(project),
                                    "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        cmd += ["--no-datastore"] if args.no_datastore else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
        env.update({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "stand-in",  # never contacted
                    "MEDIA_ALLOW_PRIVATE_NETWORKS": "127.0.0.1/32", "DEVICE": args.device,
                    "MODEL_DIR": str(project / "model_dir"), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": str(args.threads)})
        result = _timed(cmd, env, self.pid)
        ranks = [json.loads(p.read_text()) for p in sorted(project.glob("rank*.json"))]
        stored = [t for r in ranks for t in r["stored"]]
        tasks = json.loads((project / "tasks.json").read_text())
        result["check"] = {"devices": [r["devices"] for r in ranks], "stored_once": sorted(stored) == sorted(
            int(k) for k in tasks), "rank_shares": [len(r["stored"]) for r in ranks]}
        return result


def standin_worker(args) -> int:
    """One prelabel process of --stand-in (rank RANK under torchrun): the real ``backend.prelabel.run`` with the
    stand-in client; writes what it stored and on which device to ``rank<r>.json``."""
    from backend import prelabel
    from backend.serving.model_manager import default_predictor_factory
    from tests.fakes import FakeLabelStudio

    project = Path(args.stand_in_worker)
    ls = FakeLabelStudio({int(k): v for k, v in json.loads((project / "tasks.json").read_text()).items()})
    devices: list[str] = []

    def predictor_factory(config, checkpoint):
        predictor = default_predictor_factory(config, checkpoint)
        devices.append(str(predictor.device))
        return predictor

    summary = prelabel.run(prelabel.Options(project=1, batch_size=args.batch_size, workers=args.workers,
                                            progress=False), client_factory=lambda host, token: ls,
                           predictor_factory=predictor_factory,
                           store_factory=(lambda config: None) if args.no_datastore else None)
    rank = int(os.environ.get("RANK", "0"))
    stored = [p["task"] for p in ls.stored]
    (project / f"rank{rank}.json").write_text(json.dumps({"devices": devices, "stored": stored}))
    if summary is not None:
        print(json.dumps(summary.to_json()), flush=True)
    return 0


def _timed(cmd: list[str], env: dict, server_pid: int) -> dict:
    """Run one prelabel command: its summary, wall time, its CPU seconds and the server's (Label Studio's or the file
    server's) during it."""
    children, server_cpu = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(server_pid)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"prelabel failed ({r.returncode}):\n{r.stderr[-3000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    return {"command_s": wall, "ls_cpu_s": cpu_seconds(server_pid) - server_cpu,
            "prelabel_cpu_s": after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, **summary}


def upload_costs(studio: Studio, source_pid: int, data: list, batch: int) -> dict:
    """The predictions prelabel stored in ``source_pid``, stored again into a fresh project: half with one bulk
    import per batch, half with one ``predictions.create`` per task. Milliseconds per prediction."""
    from label_studio_sdk import PredictionRequest

    stored = studio.client.predictions.list(project=source_pid)
    preds = sorted(stored, key=lambda p: p.task)
    pid = studio.project("prelabel-bench-uploads", data)
    ids = studio.task_ids(pid)
    half = len(ids) // 2
    t = time.perf_counter()
    for i in range(0, half, batch):
        studio.client.projects.import_predictions(id=pid, request=[
            PredictionRequest(task=tid, result=p.result, score=p.score, model_version=p.model_version)
            for tid, p in zip(ids[i:min(i + batch, half)], preds[i:min(i + batch, half)])])
    bulk_s = time.perf_counter() - t
    t = time.perf_counter()
    for tid, p in zip(ids[half:], preds[half:]):
        studio.client.predictions.create(task=tid, result=p.result, score=p.score, model_version=p.model_version)
    each_s = time.perf_counter() - t
    rle_bytes = statistics.mean(len(json.dumps(p.result)) for p in preds) if preds else 0
    return {"bulk_ms_per_prediction": 1000 * bulk_s / max(1, half),
            "create_ms_per_prediction": 1000 * each_s / max(1, len(ids) - half),
            "predictions": len(ids), "mean_result_json_bytes": rle_bytes}


# ---------------------------------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stand_in_worker:
        return standin_worker(args)
    if not args.stand_in:
        ok, msg = ensure_ls_venv()
        if not ok:
            print(f"cannot create the Label Studio environment (.venv-ls): {msg}", file=sys.stderr)
            return 1
    import torch

    torch.set_num_threads(args.threads)
    data = scenes(args.n, args.seed, args.size)
    size = Image.open(io.BytesIO(data[0][0])).size
    n = args.n
    where = "a stand-in client and a static file server" if args.stand_in else "Label Studio 1.23.2"
    print(f"{n} scenes of {size[0]}x{size[1]}, batch {args.batch_size}, device {args.device}, {args.threads} torch "
          f"thread(s) per process, {args.rounds} round(s), against {where}", flush=True)
    rounds, uploads = [], None
    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as tmp:
        work = Path(tmp)
        if args.stand_in:
            target = StandIn(work, data)
            close = target.close
        else:
            ls = start_label_studio(work)
            close = lambda: stop(ls.proc)  # noqa: E731
        try:
            if not args.stand_in:
                wait_http(f"{ls.url}/health", ls.proc, 180, ls.log)
                target = Studio(ls.url, ls.proc.pid, work)
            # rounds: the bare predictor and each prelabel run back to back, so that a busy machine slows all alike
            for r in range(args.rounds):
                projects = {p: target.project(f"prelabel-bench-{r}-{p}", data) for p in args.processes}
                b = bare(data, args.batch_size, args.device)
                runs = [{"processes": p, **(target.run(project, p, args) if args.stand_in
                                           else prelabel_run(target, project, p, args))}
                        for p, project in projects.items()]
                rounds.append({"bare": b, "prelabel": runs, "load_avg": os.getloadavg()[0]})
                print(f"round {r}: bare {n / b['model_s']:.2f} img/s, +decode+RLE {n / b['with_decode_rle_s']:.2f}; "
                      + "; ".join(f"prelabel x{x['processes']} {x['images_per_s']} img/s (pipeline {x['pipeline_s']} "
                                  f"s, stages {x['stages']}, command {x['command_s']:.1f} s, {x.get('check')})"
                                  for x in runs)
                      + f"; load {rounds[-1]['load_avg']:.1f}", flush=True)
            if not args.stand_in:
                uploads = upload_costs(target, projects[args.processes[0]], data, args.batch_size)
                print(f"uploads: {uploads}", flush=True)
        finally:
            close()

    def rate(seconds: list[float]) -> float:
        return n / _median(seconds)

    base = rate([r["bare"]["model_s"] for r in rounds])
    rows = [("bare predict_batch (decoded images)", [r["bare"]["model_s"] for r in rounds], None),
            ("bare + PNG decode + brush RLE", [r["bare"]["with_decode_rle_s"] for r in rounds], None)]
    for i, p in enumerate(args.processes):
        label = f"{p} process{'es' if p > 1 else ''}" + (" (torchrun)" if p > 1 else "")
        rows.append((f"ssp-sam prelabel, {label}: pipeline", [r["prelabel"][i]["pipeline_s"] for r in rounds],
                     [r["prelabel"][i]["pipeline_s"] / r["bare"]["model_s"] for r in rounds]))
        rows.append((f"ssp-sam prelabel, {label}: whole command", [r["prelabel"][i]["command_s"] for r in rounds],
                     None))
    print(f"\n{n} tasks of {size[0]}x{size[1]}, batch {args.batch_size}, {machine()['cores']} cores, {args.device}, "
          f"{args.threads} torch thread(s) per process, median of {args.rounds} round(s), against {where}")
    print("| pipeline | seconds | images/s | vs bare predict_batch |")
    print("|---|---:|---:|---:|")
    table = []
    for name, seconds, ratios in rows:
        r = rate(seconds)
        # a prelabel row is compared round by round (median of its per-round ratios); the others with the medians
        vs = 1 / _median(ratios) if ratios else r / base
        table.append({"row": name, "seconds": round(_median(seconds), 2), "images_per_s": round(r, 2),
                      "vs_bare": round(vs, 3), "seconds_per_round": [round(x, 2) for x in seconds]})
        print(f"| {name} | {_median(seconds):.1f} | {r:.2f} | {100 * vs:.0f} % |")
    stages = {k: _median([r["prelabel"][0]["stages"][k] for r in rounds]) for k in rounds[0]["prelabel"][0]["stages"]}
    print(f"\nprelabel ({args.processes[0]} process) pipeline stages, median seconds: {stages}")
    cpu = {"bare_model_ms_per_task": 1000 * _median([r["bare"]["model_cpu_s"] for r in rounds]) / n}
    for i, p in enumerate(args.processes):
        cpu[f"prelabel_{p}_ms_per_task"] = 1000 * _median([r["prelabel"][i]["prelabel_cpu_s"] for r in rounds]) / n
        server = "file_server" if args.stand_in else "label_studio"
        cpu[f"{server}_{p}_ms_per_task"] = 1000 * _median([r["prelabel"][i]["ls_cpu_s"] for r in rounds]) / n
    print("CPU per task (ms): " + ", ".join(f"{k.replace('_ms_per_task', '')} {v:.0f}" for k, v in cpu.items())
          + " (prelabel: the whole command, start-up included)")
    print(f"bare: PNG decode {_median([r['bare']['decode_s'] for r in rounds]):.2f} s, brush RLE "
          f"{_median([r['bare']['rle_s'] for r in rounds]):.2f} s")
    if uploads:
        print(f"storing one prediction: bulk import {uploads['bulk_ms_per_prediction']:.1f} ms, predictions.create "
              f"{uploads['create_ms_per_prediction']:.1f} ms (mean result {uploads['mean_result_json_bytes']:.0f} "
              f"bytes of JSON)")
    suffix = ("_stand_in" if args.stand_in else "") + ("_no_datastore" if args.no_datastore else "")
    out = args.out or str(ROOT / "bench" / "results" / f"prelabel{suffix}.json")
    out = write_json(out, {"against": where, "datastore_records": not args.no_datastore, "n": n, "image_size": list(size), "batch_size": args.batch_size,
                                "workers": args.workers, "device": args.device, "threads": args.threads,
                                "rounds": rounds,
                                "uploads": uploads, "table": table, "prelabel_stages_median_s": stages,
                                "cpu_ms_per_task": cpu})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
