"""Interactive segmentation with simulated clicks, side by side: for each model (the packaged demo by default) and
with / without the previous mask as SAM's dense prompt, IoU after 0, 1, 2, 3 and 5 clicks and NoC@85 / NoC@90 (mean
clicks to reach that IoU, capped at ``--max-clicks``) for three modes on the same held-out scenes: the sentence
alone, the sentence then clicks, clicks alone (plain SAM).

Usage: python bench/clicks.py [--checkpoints PATH ...] [--data synthetic:1000:seed=2] [--max-clicks 20]
Prints a markdown table and writes bench/results/clicks.json (``--out``) with the machine, date and command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_json  # noqa: E402
from ssp_sam.build import ModelConfig, load_model  # noqa: E402
from ssp_sam.data.datasets import load_dataset  # noqa: E402
from ssp_sam.evaluate import evaluate_clicks  # noqa: E402

REPORT = (0, 1, 2, 3, 5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", nargs="+", default=[None],
                    help="demo-variant bundles to compare (default: the packaged demo model)")
    ap.add_argument("--data", default="synthetic:1000:seed=2", help="held-out scenes (never trained on)")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "clicks.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    m = machine()
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; data {args.data}, "
          f"NoC cap {args.max_clicks}")
    print("| model | mask prompt | mode | " + " | ".join(f"IoU@{k}" for k in REPORT) + " | NoC@85 | NoC@90 |")
    print("|---|---|---|" + "---:|" * (len(REPORT) + 2))
    results = []
    for ckpt in args.checkpoints:
        loaded = load_model(ModelConfig(variant="demo", checkpoint=ckpt, device="cpu"))
        for mask_prompt in (True, False):
            t0 = time.perf_counter()
            c = evaluate_clicks(loaded.model, loaded.tokenizer, data, max_clicks=args.max_clicks, report=REPORT,
                                mask_prompt=mask_prompt, batch_size=args.batch_size)
            results.append({"model": loaded.version, "checkpoint": ckpt, "mask_prompt": mask_prompt,
                            "seconds": time.perf_counter() - t0, "metrics": c})
            for mode in ("sentence", "sentence+clicks", "clicks"):
                if mode == "sentence":
                    cells = [f"{100 * c['sentence/mIoU']:.1f}"] + ["-"] * (len(REPORT) + 1)
                else:
                    cells = [f"{100 * c[f'{mode}/IoU@{k}']:.1f}" for k in REPORT] + \
                            [f"{c[f'{mode}/NoC@85']:.2f}", f"{c[f'{mode}/NoC@90']:.2f}"]
                print(f"| {loaded.version} | {'on' if mask_prompt else 'off'} | {mode} | " + " | ".join(cells) + " |",
                      flush=True)
    out = write_json(args.out, {"data": args.data, "max_clicks": args.max_clicks, "n": int(c["n"]),
                                "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
