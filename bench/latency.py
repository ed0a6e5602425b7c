"""Inference latency of the predictor, per variant: first sentence on a new image (SAM + CLIP image encoders run),
a new sentence on a cached image (prompt path + mask decoder only), and batched throughput.

Usage: python bench/latency.py [--variants demo ssp-sam-224-vit-b] [--device cpu|cuda] [--dtype auto] [--repeat 3]
Random weights are used for variants without a configured checkpoint: timings do not depend on weight values.
Prints a markdown table; numbers are for the machine it runs on.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from ssp_sam.build import LoadedModel, ModelConfig, build_model, load_model, resolve_device, resolve_dtype
from ssp_sam.predictor import SSPSAMPredictor
from ssp_sam.tokenizer import load_tokenizer


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


def bench(variant: str, device: str, dtype: str, repeat: int, batch: int) -> dict:
    loaded = _loaded(variant, device, dtype)
    pred = SSPSAMPredictor(loaded)
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, (480, 640, 3)).astype(np.uint8) for _ in range(repeat + 1)]
    pred.predict(images[-1], "warm up")  # first call pays one-off costs
    cold, warm = [], []
    for i in range(repeat):
        _sync(loaded.device)
        t = time.perf_counter()
        pred.predict(images[i], f"the red circle number {i}")
        _sync(loaded.device)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.predict(images[i], f"the blue square on the left {i}")
        _sync(loaded.device)
        warm.append(time.perf_counter() - t)
    pairs = [(images[i % repeat], f"object {i}") for i in range(batch)]
    pred.image_cache.clear()
    t = time.perf_counter()
    pred.predict_batch(pairs, batch_size=min(batch, 16))
    _sync(loaded.device)
    thr = batch / (time.perf_counter() - t)
    return dict(variant=variant, device=str(loaded.device), dtype=str(loaded.dtype).replace("torch.", ""),
                cold_ms=1000 * statistics.median(cold), warm_ms=1000 * statistics.median(warm), pairs_per_s=thr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["demo", "ssp-sam-224-vit-b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="pairs in the throughput run (over `repeat` images)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("| variant | device | dtype | new image + sentence (ms) | new sentence, cached image (ms) | pairs/s (batch) |")
    print("|---|---|---|---:|---:|---:|")
    for v in args.variants:
        r = bench(v, args.device, args.dtype, args.repeat, args.batch)
        print(f"| {r['variant']} | {r['device']} | {r['dtype']} | {r['cold_ms']:.0f} | {r['warm_ms']:.0f} | "
              f"{r['pairs_per_s']:.2f} |")


if __name__ == "__main__":
    main()
