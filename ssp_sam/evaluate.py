"""Referring-segmentation metrics of a model on a dataset: :func:`evaluate_model` (used by training, the fine-tuning
round and the benchmarks) and ``ssp-sam eval``, which prints a table and writes JSON.

Metrics (ssp_sam.metrics): mIoU/gIoU, oIoU/cIoU, Pr@0.50..0.90, N-acc, T-acc in the padded SAM frame (official) and
at original resolution (``orig/``), plus per-kind mIoU for the synthetic benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ssp_sam.batches import TrainView, collate, forward_batch
from ssp_sam.data import Sample
from ssp_sam.distributed import gather_objects, rank_and_world
from ssp_sam.metrics import MetricAccumulator, empty_threshold, format_table
from ssp_sam.options import add_model_args, model_config_from_args
from ssp_sam.transforms import frame_to_original


@torch.no_grad()
def evaluate_model(model, tokenizer, dataset: Sequence[Sample], batch_size: int = 16, device: str | None = None,
                   original_resolution: bool = True, by_kind: bool = True, max_samples: int | None = None,
                   progress: bool = False, threshold: float = 0.0,
                   embeddings: Mapping[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Referring-segmentation metrics of ``model`` on ``dataset`` (a sequence of Samples).

    Returns ``{"mIoU", "oIoU", "gIoU", "cIoU", "Pr@0.50".."Pr@0.90", "N-acc", "T-acc", "n", "n_empty"}`` computed in
    the padded SAM frame (official), the same keys prefixed ``orig/`` at original resolution, and
    ``<kind>/mIoU`` per ``sample.meta["kind"]`` when ``by_kind``. ``threshold``: logit threshold (0 = sigmoid 0.5).
    ``embeddings``: cached SAM embeddings by sample index (a frozen encoder). Under torch.distributed every rank
    scores its shard and all ranks get the merged result. The model is left in the mode it came in.
    """
    from tqdm import tqdm

    rank, world = rank_and_world()
    spec = model.spec
    dev = torch.device(device) if device else next(model.parameters()).device
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = list(range(rank, n, world))
    view = TrainView(dataset, spec, augment=False, embeddings=embeddings, cache=False)
    was_training = model.training
    model.eval()
    frame_acc, orig_acc = MetricAccumulator(), MetricAccumulator()
    frame_thr = empty_threshold(spec.frame_size)
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="eval", disable=not progress or rank != 0):
            items = [view[i] for i in indices[start:start + batch_size]]
            logits = forward_batch(model, collate(items), tokenizer, dev).logits[:, 0].float().cpu()
            for k, it in enumerate(items):
                s = dataset[it["index"]]
                group = s.meta.get("kind") if by_kind else None
                frame_acc.add((logits[k] > threshold).numpy(), it["mask"].numpy() > 0.5, frame_thr, group)
                if original_resolution:
                    h, w = s.mask.shape
                    orig = frame_to_original(logits[k], (h, w), spec.sam_image_size) > threshold
                    orig_acc.add(orig.numpy(), s.mask, empty_threshold(max(h, w)), group)
    finally:
        model.train(was_training)
    frame_acc, orig_acc = _merge_ranks(frame_acc, orig_acc)
    metrics = frame_acc.compute(by_group=by_kind)
    if original_resolution:
        metrics.update({f"orig/{k}": v for k, v in orig_acc.compute().items()})
    return metrics


def _merge_ranks(frame_acc: MetricAccumulator, orig_acc: MetricAccumulator
                 ) -> tuple[MetricAccumulator, MetricAccumulator]:
    """The accumulators of every rank merged (unchanged in one process)."""
    states = gather_objects((frame_acc.state(), orig_acc.state()))
    if len(states) == 1:
        return frame_acc, orig_acc
    frame_acc, orig_acc = MetricAccumulator(), MetricAccumulator()
    for f_state, o_state in states:
        frame_acc.merge(MetricAccumulator.from_state(f_state))
        orig_acc.merge(MetricAccumulator.from_state(o_state))
    return frame_acc, orig_acc


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


__all__ = ["evaluate_model", "register_cli"]
