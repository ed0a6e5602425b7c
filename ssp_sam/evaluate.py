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

import numpy as np
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


CLICK_MODES = ("sentence+clicks", "clicks")


@torch.no_grad()
def evaluate_clicks(model, tokenizer, dataset: Sequence[Sample], max_clicks: int = 20,
                    report: Sequence[int] = (0, 1, 2, 3, 5), noc_thresholds: Sequence[float] = (0.85, 0.90),
                    mask_prompt: bool = False, batch_size: int = 16, device: str | None = None,
                    max_samples: int | None = None, progress: bool = False,
                    embeddings: Mapping[int, torch.Tensor] | None = None) -> dict[str, float]:
    """Interactive-segmentation metrics with simulated clicks (``ssp_sam.clicks.next_click``) on the samples that
    have a target, in the padded SAM frame, for three modes on the same samples:

    * ``sentence``: the sentence alone (``sentence/mIoU``);
    * ``sentence+clicks``: the sentence, then up to ``max_clicks`` clicks, each at the largest error;
    * ``clicks``: plain SAM clicks, the first at the object's deepest point.

    Keys: ``<mode>/IoU@k`` (mean IoU after k clicks, for k in ``report``), ``<mode>/NoC@85`` / ``NoC@90`` (mean
    number of clicks to reach that IoU, ``max_clicks`` when never; 0 when the sentence alone reaches it), ``n``.
    ``mask_prompt``: each step also gets the previous step's logits as SAM's dense prompt.
    """
    from ssp_sam.clicks import click_round
    from ssp_sam.metrics import iou

    from tqdm import tqdm

    spec = model.spec
    dev = torch.device(device) if device else next(model.parameters()).device
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = [i for i in range(n) if dataset[i].mask.any()]
    view = TrainView(dataset, spec, augment=False, embeddings=embeddings, cache=False)
    was_training = model.training
    model.eval()
    curves = {mode: [] for mode in CLICK_MODES}       # per sample: IoU after 0..max_clicks clicks
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="clicks", disable=not progress):
            batch = collate([view[i] for i in indices[start:start + batch_size]])
            gt = batch["mask"].numpy() > 0.5
            out = forward_batch(model, batch, tokenizer, dev)
            for mode in CLICK_MODES:
                text = mode == "sentence+clicks"
                prompts = out.prompts if text else None
                low = out.low_res_logits if text else None
                pred = (out.logits[:, 0] > 0).cpu().numpy() if text else np.zeros_like(gt)
                rows = [[iou(p, g)] for p, g in zip(pred, gt)]
                chains = [[] for _ in gt]
                for _ in range(max_clicks):
                    logits, low = click_round(model, out.image_embeddings, prompts, chains, pred, gt,
                                              low if mask_prompt else None)
                    pred = (logits[:, 0] > 0).cpu().numpy()
                    for row, p, g in zip(rows, pred, gt):
                        row.append(iou(p, g))
                curves[mode].extend(rows)
    finally:
        model.train(was_training)
    return click_metrics(curves, report, noc_thresholds, max_clicks)


def click_metrics(curves: Mapping[str, list[list[float]]], report: Sequence[int], noc_thresholds: Sequence[float],
                  max_clicks: int) -> dict[str, float]:
    """Per-mode IoU after k clicks and NoC from per-sample IoU curves (index k = after k clicks)."""
    out: dict[str, float] = {"n": float(len(next(iter(curves.values()))))}
    for mode, rows in curves.items():
        c = np.array(rows, dtype=np.float64).reshape(len(rows), -1)
        for k in report:
            out[f"{mode}/IoU@{k}"] = float(c[:, k].mean()) if len(c) and k < c.shape[1] else float("nan")
        for t in noc_thresholds:
            reached = c >= t - 1e-12
            if mode == "clicks":
                reached[:, 0] = False              # no click, no mask: plain SAM always needs the first one
            first = np.where(reached.any(1), reached.argmax(1), max_clicks)
            out[f"{mode}/NoC@{round(100 * t)}"] = float(first.mean()) if len(c) else float("nan")
    if "sentence+clicks" in curves:
        out["sentence/mIoU"] = out["sentence+clicks/IoU@0"]
    return out


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
    p.add_argument("--clicks", type=int, default=0, metavar="N",
                   help="also simulate up to N clicks per sample (NoC caps at N; 20 is the field's convention): IoU "
                        "after 0/1/2/3/5 clicks and NoC@85/90 for sentence only, sentence then clicks, clicks only")
    p.add_argument("--mask-prompt", action="store_true",
                   help="with --clicks: also feed the previous mask back as SAM's dense prompt (the backend's "
                        "INTERACTIVE_MASK_PROMPT)")
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
    if args.clicks > 0:
        c = evaluate_clicks(loaded.model, loaded.tokenizer, data, max_clicks=args.clicks,
                            mask_prompt=args.mask_prompt, batch_size=args.batch_size,
                            max_samples=args.max_samples, progress=True)
        print(f"\nclicks (frame, {int(c['n'])} samples with a target, NoC capped at {args.clicks}):")
        print(format_click_table(c))
        m.update({f"clicks/{k}": v for k, v in c.items()})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"model": loaded.version, "data": args.data,
                       "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}},
                      f, indent=1)
    return 0


def format_click_table(c: Mapping[str, float]) -> str:
    """One row per mode: IoU after k clicks, NoC@85, NoC@90."""
    ks = sorted(int(k.split("@")[1]) for k in c if k.startswith("clicks/IoU@"))
    head = f"{'mode':<18}" + "".join(f"{'IoU@' + str(k):>9}" for k in ks) + f"{'NoC@85':>9}{'NoC@90':>9}"
    lines = [head]
    for mode in ("sentence", *CLICK_MODES):
        if mode == "sentence":
            cells = [c["sentence+clicks/IoU@0"]] + [float("nan")] * (len(ks) - 1)
            noc = [float("nan")] * 2
        else:
            cells = [c[f"{mode}/IoU@{k}"] for k in ks]
            noc = [c[f"{mode}/NoC@85"], c[f"{mode}/NoC@90"]]
        lines.append(f"{mode:<18}" + "".join(f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>9}" for v in cells)
                     + "".join(f"{'-' if math.isnan(v) else f'{v:.2f}':>9}" for v in noc))
    return "\n".join(lines)


__all__ = ["evaluate_model", "evaluate_clicks", "click_metrics", "format_click_table", "register_cli"]
