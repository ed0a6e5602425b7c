"""``ssp-sam eval``: referring-segmentation metrics of a model on a dataset; prints a table and writes JSON.

Metrics (ssp_sam.metrics): mIoU/gIoU, oIoU/cIoU, Pr@0.50..0.90, N-acc, T-acc in the padded SAM frame (official) and
at original resolution (``orig/``), plus per-kind mIoU for the synthetic benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ssp_sam.metrics import format_table
from ssp_sam.options import add_model_args, model_config_from_args


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ssp-sam eval``."""
    p = subparsers.add_parser("eval", help="evaluate a model on a dataset (table + JSON)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic:500:seed=2",
                   help="synthetic:N[:seed=S][:domain=D] | file.jsonl | official:ROOT:DATASET:SPLIT[:images=DIR]")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--threshold", type=float, default=0.0, help="logit threshold (0 = probability 0.5)")
    p.add_argument("--out", default=None, help="write the metrics here as JSON")
    add_model_args(p)
    p.set_defaults(func=_cli_eval)


def _cli_eval(args: argparse.Namespace) -> int:
    from ssp_sam.build import load_model
    from ssp_sam.data.datasets import load_dataset
    from ssp_sam.train import evaluate_model

    loaded = load_model(model_config_from_args(args))
    data = load_dataset(args.data)
    m = evaluate_model(loaded.model, loaded.tokenizer, data, batch_size=args.batch_size,
                       max_samples=args.max_samples, threshold=args.threshold, progress=True)
    print(f"model {loaded.version} on {args.data}\n\npadded SAM frame ({loaded.spec.frame_size}^2):")
    print(format_table(m))
    print("\noriginal resolution:")
    print(format_table({k[5:]: v for k, v in m.items() if k.startswith("orig/")}))
    kinds = sorted(k[:-5] for k in m if k.endswith("/mIoU") and not k.startswith("orig/"))
    if kinds:
        print("\nper kind (frame mIoU, n): " + ", ".join(f"{k} {100 * m[k + '/mIoU']:.1f} ({int(m[k + '/n'])})"
                                                       for k in kinds))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"model": loaded.version, "data": args.data,
                       "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}},
                      f, indent=1)
    return 0


__all__ = ["register_cli"]
