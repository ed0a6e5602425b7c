"""Train the packaged demo model and measure it: ``torchrun --nproc_per_node 2 bench/train_demo.py``.

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
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--heldout", default="synthetic:1000:seed=2", help="held-out evaluation set")
    p.add_argument("--no-install", action="store_true", help="do not copy the bundle into ssp_sam/assets")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="extra TrainConfig overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from bench.common import write_json
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.data.datasets import load_dataset
    from ssp_sam.metrics import format_table
    from ssp_sam.evaluate import evaluate_model
    from ssp_sam.train import config_from_preset, train

    overrides = {"out_dir": args.out}
    if args.minutes is not None:
        overrides["time_limit_min"] = args.minutes
    if args.threads is not None:
        overrides["threads"] = args.threads
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = json.loads(v)
    cfg = config_from_preset("demo", **overrides)

    t0 = time.time()
    result = train(cfg)
    train_s = time.time() - t0
    if torch.distributed.is_initialized():  # the held-out evaluation and the install run on rank 0 alone
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    print(f"training: {result.steps} steps, {train_s / 60:.1f} min wall time (incl. data generation)")

    loaded = load_model(ModelConfig(variant="demo", checkpoint=str(result.best_path), device="cpu"))
    heldout = load_dataset(args.heldout)
    t1 = time.time()
    metrics = evaluate_model(loaded.model, loaded.tokenizer, heldout, batch_size=32)
    print(f"\nheld-out {args.heldout} ({time.time() - t1:.0f} s):\n{format_table(metrics)}")
    kinds = sorted(k[:-5] for k in metrics if k.endswith("/mIoU") and not k.startswith("orig/"))
    print("per kind mIoU: " + ", ".join(f"{k} {metrics[k + '/mIoU']:.3f}" for k in kinds))

    report = {"train_wall_time_s": round(train_s, 1), "steps": result.steps, "best_epoch": result.best_epoch,
              "config": {k: v for k, v in vars(cfg).items()}, "heldout": args.heldout,
              "heldout_metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                  for k, v in metrics.items()},
              "bundle_bytes": Path(result.best_path).stat().st_size, "torch_threads": torch.get_num_threads(),
              "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "demo_report.json", report)
    if not args.no_install:
        shutil.copyfile(result.best_path, ASSET)
        print(f"installed {ASSET} ({ASSET.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
