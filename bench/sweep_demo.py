"""Compare demo-model recipes side by side: ``python bench/sweep_demo.py --configs base c128 --minutes 6``.

Each named recipe (``RECIPES`` below: overrides of the ``demo`` variant and of the ``demo`` training preset) trains in
its own process, all at once, for the same wall-clock budget; the table reports the steps each reached and its
validation curve. On a GPU (``--device cuda``) several recipes share the card, so compare them by steps and samples
seen, not by time; on the 2-core CPU run one or two at a time. The winner's settings go into ``ssp_sam/build.py``
(variant ``demo``) and ``ssp_sam/train.py`` (preset ``demo``); ``bench/train_demo.py`` then trains the bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (variant overrides, TrainConfig overrides)
RECIPES: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "c96": (dict(clip_image_size=96), {}),
    "c128": (dict(clip_image_size=128), {}),
    "c128lr": (dict(clip_image_size=128), dict(lr=1e-3, lr_decoder=1e-3, batch_size=16)),
    "c128s256": (dict(clip_image_size=128, sam_image_size=256), {}),
    "c128wide": (dict(clip_image_size=128, clip_vision_width=128, clip_text_width=128, clip_embed_dim=128,
                      ssp_hidden_dim=128), {}),
    "c128e2e": (dict(clip_image_size=128), dict(train_sam_encoder=True)),
    "patch2": ({}, dict(patch_loss_weight=2.0)),
    "patch5": ({}, dict(patch_loss_weight=5.0)),
    "patch10": ({}, dict(patch_loss_weight=10.0)),
    "patch20": ({}, dict(patch_loss_weight=20.0)),
    "p20c128": (dict(clip_image_size=128), dict(patch_loss_weight=20.0)),
    "p20e2e": ({}, dict(patch_loss_weight=20.0, train_sam_encoder=True)),
    # a cheaper SAM encoder (depth 2: its forward + backward is ~0.09 s of a ~0.33 s step instead of ~0.18 s) and
    # a deeper prompt generator (where the positional reasoning has to happen)
    "deep": (dict(sam_encoder=dict(embed_dim=96, depth=2, num_heads=4, global_attn_indexes=(1,)), prompt_layers=4),
             {}),
    # more positional sentences in the training mix (the held-out benchmark keeps the default mix)
    "kinds": ({}, dict(train_data="synthetic:6000:seed=0:kinds=attr=0.2,abs_pos=0.2,rel_pos=0.16,ordinal=0.14,"
                                  "multi=0.1,none=0.2")),
}


def run_one(name: str, minutes: float, device: str, out: Path, threads: int, extra: dict) -> None:
    """Train one recipe (in this process) and write ``<out>/<name>/summary.json``."""
    from ssp_sam.build import VARIANTS
    from ssp_sam.train import config_from_preset, train

    variant_over, train_over = RECIPES[name]
    VARIANTS[f"demo-{name}"] = dataclasses.replace(VARIANTS["demo"], name=f"demo-{name}", **variant_over)
    cfg = config_from_preset("demo", variant=f"demo-{name}", out_dir=str(out / name), time_limit_min=minutes,
                             device=device, threads=threads, epochs=1000, progress=False,
                             **{**extra, **train_over})  # a recipe's own settings win over --set
    t0 = time.time()
    result = train(cfg)
    summary = {"recipe": name, "variant": variant_over, "train": train_over, "steps": result.steps,
               "samples": result.steps * cfg.batch_size, "wall_s": round(time.time() - t0, 1),
               "best_epoch": result.best_epoch,
               "best": {k: result.best_metrics.get(k) for k in ("mIoU", "N-acc", "attr/mIoU", "abs_pos/mIoU",
                                                                 "rel_pos/mIoU", "ordinal/mIoU", "multi/mIoU")},
               "curve": [(h["step"], round(h.get("val/mIoU", float("nan")), 3)) for h in result.history]}
    (out / name / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget of every recipe")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per recipe process")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                    help="TrainConfig overrides for every recipe (a recipe's own settings win)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.one:
        run_one(args.one, args.minutes, args.device, out, args.threads, extra)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = {}, []
    for name in args.configs:
        (out / name).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--one", name, "--minutes", str(args.minutes), "--device", args.device,
               "--threads", str(args.threads), "--out", str(out), "--set", *args.set]
        logs.append(open(out / name / "stdout.log", "w"))
        procs[name] = subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    codes = {name: p.wait() for name, p in procs.items()}
    for log in logs:
        log.close()
    rows = []
    for name in args.configs:
        path = out / name / "summary.json"
        if not path.exists():
            rows.append(f"| {name} | failed (exit {codes[name]}, see {out / name / 'stdout.log'}) |")
            continue
        s = json.loads(path.read_text())
        b = s["best"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"| {name} | {s['steps']} | {s['samples']} | {fmt(b['mIoU'])} | {fmt(b['N-acc'])} | "
                    + " | ".join(fmt(b[k]) for k in ("attr/mIoU", "abs_pos/mIoU", "rel_pos/mIoU", "ordinal/mIoU",
                                                     "multi/mIoU"))
                    + " | " + " ".join(f"{v:.2f}" for _, v in s["curve"]) + " |")
    header = ("| recipe | steps | samples | best val mIoU | N-acc | attr | abs_pos | rel_pos | ordinal | multi | "
              "val mIoU by epoch |\n|---|---|---|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    (out / "table.md").write_text(table + "\n")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
