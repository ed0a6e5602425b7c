"""Train the packaged demo model and measure it: ``torchrun --nproc_per_node 2 bench/train_demo.py``.

``--preset demo-clicks`` (``python bench/train_demo.py --preset demo-clicks``) is the second stage: click training
from the packaged bundle; the held-out table then compares the start and the new model side by side (sentence
metrics and simulated clicks), and the new bundle is installed only when its sentence-only mIoU is not worse.

Runs as one process too (``python bench/train_demo.py``); two processes (one per core, gloo, one torch thread
each) see twice the samples in the same wall-clock budget on the 2-core machine.

1. ``ssp_sam.train.train`` with the ``demo`` preset (synthetic base-domain scenes, everything from scratch);
2. evaluate the best bundle on held-out synthetic scenes (seed 2, never used for training or validation);
3. copy the bundle to ``ssp_sam/assets/ssp_sam_demo.pt`` (``--no-install`` to skip) and write
   ``<out>/demo_report.json`` with the wall time and the held-out metrics.

See docs/training.md ("The demo model").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/train_demo.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))

ASSET = ROOT / "ssp_sam" / "assets" / "ssp_sam_demo.pt"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget in minutes (preset: 24)")
    p.add_argument("--out", default=None, help="run folder (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--heldout", default="synthetic:1000:seed=2", help="held-out evaluation set")
    p.add_argument("--no-install", action="store_true", help="do not copy the bundle into ssp_sam/assets")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="extra TrainConfig overrides")
    p.add_argument("--preset", default="demo", choices=("demo", "demo-clicks"),
                   help="demo: from scratch; demo-clicks: click training from the packaged bundle")
    p.add_argument("--clicks", type=int, default=20, help="simulated clicks per held-out sample (NoC cap)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from bench.common import write_json
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.data.datasets import load_dataset
    from ssp_sam.metrics import format_table
    from ssp_sam.evaluate import evaluate_clicks, evaluate_model, format_click_table
    from ssp_sam.train import config_from_preset, train

    overrides = {"out_dir": args.out} if args.out else {}
    start = None
    if args.preset == "demo-clicks":                   # the bundle it starts from, kept: the install replaces it
        start = Path(config_from_preset(args.preset, **overrides).out_dir) / "start.pt"
        start.parent.mkdir(parents=True, exist_ok=True)
        if not start.exists():
            shutil.copyfile(ASSET, start)
        overrides["init_checkpoint"] = str(start)
    if args.minutes is not None:
        overrides["time_limit_min"] = args.minutes
    if args.threads is not None:
        overrides["threads"] = args.threads
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    cfg = config_from_preset(args.preset, **overrides)
    out_dir = Path(cfg.out_dir)

    t0 = time.time()
    result = train(cfg)
    train_s = time.time() - t0
    if torch.distributed.is_initialized():  # the held-out evaluation and the install run on rank 0 alone
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    print(f"training: {result.steps} steps, {train_s / 60:.1f} min wall time (incl. data generation)")

    heldout = load_dataset(args.heldout)
    models = {"new": result.best_path, **({"start": start} if start else {})}
    measured = {}
    for name, path in models.items():
        loaded = load_model(ModelConfig(variant="demo", checkpoint=str(path), device="cpu"))
        t1 = time.time()
        metrics = evaluate_model(loaded.model, loaded.tokenizer, heldout, batch_size=32)
        clicks = evaluate_clicks(loaded.model, loaded.tokenizer, heldout, max_clicks=args.clicks, batch_size=32)
        measured[name] = (metrics, clicks)
        print(f"\n{name} model, held-out {args.heldout} ({time.time() - t1:.0f} s):\n{format_table(metrics)}")
        kinds = sorted(k[:-5] for k in metrics if k.endswith("/mIoU") and not k.startswith("orig/"))
        print("per kind mIoU: " + ", ".join(f"{k} {metrics[k + '/mIoU']:.3f}" for k in kinds))
        print(f"simulated clicks (NoC cap {args.clicks}):\n{format_click_table(clicks)}")
    metrics, clicks = measured["new"]
    not_worse = start is None or metrics["mIoU"] >= measured["start"][0]["mIoU"] - 1e-9

    report = {"train_wall_time_s": round(train_s, 1), "steps": result.steps, "best_epoch": result.best_epoch,
              "config": {k: v for k, v in vars(cfg).items()}, "heldout": args.heldout,
              "heldout_metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                  for k, v in metrics.items()},
              "heldout_clicks": clicks, "start_model": ({"heldout_metrics": measured["start"][0],
                                                         "heldout_clicks": measured["start"][1]} if start else None),
              "bundle_bytes": Path(result.best_path).stat().st_size, "torch_threads": torch.get_num_threads(),
              "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "demo_report.json", report)
    if not not_worse:
        print(f"NOT installed: sentence-only mIoU {metrics['mIoU']:.4f} is below the start model's "
              f"{measured['start'][0]['mIoU']:.4f}")
    elif not args.no_install:
        shutil.copyfile(result.best_path, ASSET)
        print(f"installed {ASSET} ({ASSET.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
