"""Inference latency of the predictor, per variant and per attention / compile setting, side by side: first sentence
on a new image (SAM + CLIP image encoders run), a new sentence on a cached image (text tower, prompt encoder and mask
decoder only), an interactive click on a cached image after that sentence (sentence + clicks, the previous mask as
dense prompt) and a plain SAM click there, and batched throughput (new images encoded in batches).

Usage: python bench/latency.py [--variants demo ssp-sam-224-vit-b] [--device cpu|cuda] [--dtype auto]
                               [--sdpa on off] [--compile off on] [--repeat 3] [--batch 8] [--size 640x480]
Random weights are used for variants without a configured checkpoint: timings do not depend on weight values. The
settings of one variant take turns repeat by repeat (each on its own new images), so that the load of a shared
machine falls on all of them alike; medians are reported, with the stage times (``ssp_sam.timing``). Prints a
markdown table and writes bench/results/latency.json (``--out``) with the machine, date and command.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, parse_size, write_json  # noqa: E402
from ssp_sam import timing  # noqa: E402
from ssp_sam.build import (LoadedModel, ModelConfig, build_model, compile_encoders, load_model,  # noqa: E402
                           resolve_device, resolve_dtype)
from ssp_sam.modeling.attention import use_sdpa  # noqa: E402
from ssp_sam.predictor import SSPSAMPredictor  # noqa: E402
from ssp_sam.tokenizer import load_tokenizer  # noqa: E402


def _loaded(variant: str, device: str, dtype: str) -> LoadedModel:
    if variant == "demo":
        return load_model(ModelConfig(variant="demo", device=device, dtype=dtype))
    model = build_model(variant)
    dev = resolve_device(device)
    return LoadedModel(model.to(dev).eval(), load_tokenizer(model.spec), model.spec, f"{variant}-random", dev,
                       resolve_dtype(dtype, dev))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    with timing.collect() as t:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds = time.perf_counter() - t0
    return seconds, t.seconds


def _median_stages(stage_dicts: list[dict]) -> dict:
    names = {k for d in stage_dicts for k in d}
    return {k: 1000 * statistics.median([d.get(k, 0.0) for d in stage_dicts]) for k in sorted(names)}


def bench(variant: str, device: str, dtype: str, repeat: int, batch: int, size: tuple[int, int],
          settings: list[tuple[bool, bool]]) -> list[dict]:
    """``settings``: (sdpa, compile) pairs, measured side by side on copies of one model."""
    base = _loaded(variant, device, dtype)
    models = {}
    for sdpa, compiled in settings:
        model = base.model if not compiled else copy.deepcopy(base.model)
        loaded = LoadedModel(model, base.tokenizer, base.spec, base.version, base.device, base.dtype)
        if compiled:
            use_sdpa(model, sdpa)
            t0 = time.perf_counter()
            done = compile_encoders(model, device=base.device, dtype=base.dtype)
            print(f"{variant}: compiled ({done}) in {time.perf_counter() - t0:.0f} s", flush=True)
        models[(sdpa, compiled)] = SSPSAMPredictor(loaded)
    w, h = size
    rng = np.random.RandomState(0)
    new_image = lambda: rng.randint(0, 255, (h, w, 3)).astype(np.uint8)  # noqa: E731
    rows = {k: {"cold": [], "warm": [], "click": [], "click_only": [], "cold_stages": [], "warm_stages": [],
                "click_stages": []} for k in models}
    for (sdpa, compiled), pred in models.items():                # one-off costs (and compiling) out of the way
        use_sdpa(pred.model, sdpa)
        pred.predict(new_image(), "warm up")
    for i in range(repeat):
        for (sdpa, compiled), pred in models.items():
            use_sdpa(pred.model, sdpa)
            img = new_image()
            s, st = _timed(lambda: pred.predict(img, f"the red circle number {i}"), base.device)
            rows[(sdpa, compiled)]["cold"].append(s)
            rows[(sdpa, compiled)]["cold_stages"].append(st)
            sentence = f"the blue square on the left {i}"
            s, st = _timed(lambda: pred.predict(img, sentence), base.device)
            rows[(sdpa, compiled)]["warm"].append(s)
            rows[(sdpa, compiled)]["warm_stages"].append(st)
            first = pred.predict_interactive(img, sentence)         # the session's sentence step (not timed)
            clicks, labels = [[w * 0.3, h * 0.4], [w * 0.6, h * 0.5]], [1, 0]
            s, st = _timed(lambda: pred.predict_interactive(img, sentence, clicks, labels,
                                                            mask_input=first.low_res_logits), base.device)
            rows[(sdpa, compiled)]["click"].append(s)
            rows[(sdpa, compiled)]["click_stages"].append(st)
            s, _ = _timed(lambda: pred.predict_interactive(img, None, clicks[:1], labels[:1]), base.device)
            rows[(sdpa, compiled)]["click_only"].append(s)
    out = []
    for (sdpa, compiled), pred in models.items():
        use_sdpa(pred.model, sdpa)
        pairs = [(new_image(), f"object {k}") for k in range(batch)]
        pred.image_cache.clear()
        s, _ = _timed(lambda: pred.predict_batch(pairs, batch_size=min(batch, 16)), base.device)
        r = rows[(sdpa, compiled)]
        out.append(dict(variant=variant, device=str(base.device), dtype=str(base.dtype).replace("torch.", ""),
                        sdpa=sdpa, compile=compiled, image=f"{w}x{h}", repeat=repeat,
                        cold_ms=1000 * statistics.median(r["cold"]), warm_ms=1000 * statistics.median(r["warm"]),
                        click_ms=1000 * statistics.median(r["click"]),
                        click_only_ms=1000 * statistics.median(r["click_only"]),
                        cold_ms_all=[1000 * v for v in r["cold"]], warm_ms_all=[1000 * v for v in r["warm"]],
                        click_ms_all=[1000 * v for v in r["click"]], click_stages_ms=_median_stages(r["click_stages"]),
                        cold_stages_ms=_median_stages(r["cold_stages"]),
                        warm_stages_ms=_median_stages(r["warm_stages"]), batch=batch, images_per_s=batch / s))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["demo", "ssp-sam-224-vit-b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sdpa", nargs="+", choices=["on", "off"], default=["on"])
    ap.add_argument("--compile", nargs="+", choices=["on", "off"], default=["off"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="new images in the throughput run (one sentence each)")
    ap.add_argument("--size", default="640x480", help="WxH of the images")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = parse_size(args.size)
    settings = [(s == "on", c == "on") for c in args.compile for s in args.sdpa]
    m = machine()
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, gpu: {m.get('gpu', 'none')}")
    results = []
    print("| variant | device | dtype | SDPA | compile | new image + sentence (ms) | new sentence, cached image (ms) "
          "| click after the sentence, cached image (ms) | plain SAM click (ms) "
          "| SAM encoder (ms) | CLIP image (ms) | images/s (batch) |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in args.variants:
        for r in bench(v, args.device, args.dtype, args.repeat, args.batch, size, settings):
            results.append(r)
            print(f"| {r['variant']} | {r['device']} | {r['dtype']} | {'on' if r['sdpa'] else 'off'} | "
                  f"{'on' if r['compile'] else 'off'} | {r['cold_ms']:.0f} | {r['warm_ms']:.0f} | "
                  f"{r['click_ms']:.1f} | {r['click_only_ms']:.1f} | "
                  f"{r['cold_stages_ms'].get('sam_encoder', 0):.0f} | {r['cold_stages_ms'].get('clip_vision', 0):.0f} "
                  f"| {r['images_per_s']:.2f} |", flush=True)
    print(f"wrote {write_json(args.out, {'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
