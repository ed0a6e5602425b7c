"""Throughput of ``ssp-sam prelabel`` (bulk pre-labeling of a project), images per second end to end: the listing,
downloads and decoding ahead of the model, the model in batches, the regions, the upload of the predictions.

Label Studio is replaced by the in-memory SDK client of the tests (``tests.fakes.FakeLabelStudio``: the project, its
tasks and the stored predictions) and its media by a local HTTP server (``tests.local_http.LocalMediaServer``,
uploads with a legacy token), so the number is the backend's own; the model is the configured one (random weights
without a checkpoint). ``ssp-sam prelabel`` is built on another branch: without it this script says so and exits 0.

    python bench/prelabel_throughput.py --model ssp-sam-224 --device cuda --dtype bf16 --tasks 64 --batch-size 16
    python bench/prelabel_throughput.py --smoke

Writes bench/results/prelabel_throughput.json (``--out``) with the machine, date and command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import parse_size, write_json  # noqa: E402
from bench.server_latency import TOKEN, encode, photo_like  # noqa: E402
from tests.local_http import LocalMediaServer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ssp-sam-224-vit-b", help="SSP_SAM_VARIANT (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="download/decode threads")
    ap.add_argument("--size", default="1024x768", help="WxH of the task images (JPEG)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prelabel_throughput.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, 6 small tasks")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.tasks, args.batch_size, args.size = "tiny", 6, 2, "96x64"
    try:
        from backend import prelabel
        from tests.fakes import FakeLabelStudio
        from tests.payloads import TEST_LABEL_CONFIG
    except ImportError as exc:
        print(f"ssp-sam prelabel is not in this checkout ({exc}): skipped")
        return 0
    from backend.config import BackendConfig

    w, h = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as tmp, LocalMediaServer(token=TOKEN) as media:
        data = {}
        for i in range(args.tasks):
            url = media.add_upload(f"task{i}.jpg", encode(photo_like(w, h, i), "JPEG"))
            data[i + 1] = {"image": url, "text": f"the object number {i}"}
        ls = FakeLabelStudio(data, label_config=TEST_LABEL_CONFIG)
        config = BackendConfig.from_env({"MODEL_DIR": str(Path(tmp) / "md"), "LABEL_STUDIO_URL": media.origin,
                                         "LABEL_STUDIO_API_KEY": TOKEN, "SSP_SAM_VARIANT": args.model,
                                         "DEVICE": args.device, "DTYPE": args.dtype})
        options = prelabel.Options(project=1, batch_size=args.batch_size, workers=args.workers, progress=False)
        t0 = time.perf_counter()
        summary = prelabel.run(options, config, client_factory=lambda host, token: ls)
        seconds = time.perf_counter() - t0
    result = summary.to_json()
    stored = len(ls.stored)
    print(f"{args.model} on {args.device} ({args.dtype}): {result.get('done')} of {args.tasks} tasks, "
          f"{result.get('images_per_s')} images/s over the pipeline ({result.get('pipeline_s')} s: downloads, model, "
          f"uploads), {seconds:.1f} s with the model load; {stored} predictions stored")
    path = write_json(args.out, {"model": args.model, "device": args.device, "dtype": args.dtype,
                                 "tasks": args.tasks, "batch_size": args.batch_size, "image": args.size,
                                 "seconds_with_load": seconds, "summary": result, "stored": stored})
    print(f"wrote {path}")
    return 0 if result.get("done") == args.tasks and stored == args.tasks else 1


if __name__ == "__main__":
    sys.exit(main())
