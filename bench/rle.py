"""Brush RLE encoding speed, side by side in one run: this project's encoder (``ssp_sam.data.masks.mask_to_brush_rle``),
label-studio-sdk's reference ``mask2rle`` and the Rust encoder of ``label-studio-brush-rle-rs`` (PyPI; module
``label_studio_brush_rle_rs``, pinned in requirements-dev.txt), and whether all three write the same bytes.

Usage: python bench/rle.py [--sizes 1024x1024 4000x3000] [--shapes blob noisy empty full] [--repeat 5]
                           [--budget-s 20] [--out bench/results/rle.json]

Each encoder is timed end to end, from a 2-D mask to the list of ints a BrushLabels result carries: ours from the bool
mask; the SDK from the 0/255 uint8 mask it takes; the Rust one from the RGBA-repeated values it takes (``np.repeat``
to bytes is part of its time) to ``list(bytes)``. A cell is the median of ``--repeat`` runs, fewer when the runs so far already
took ``--budget-s`` (the JSON records how many). Sizes are WIDTHxHEIGHT. Prints a markdown table and writes the JSON
(with the machine, the date and the command).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import parse_size, write_json  # noqa: E402
from ssp_sam.data.masks import mask_to_brush_rle  # noqa: E402

SHAPES = ("blob", "noisy", "empty", "full")


def make_mask(shape: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """blob: a few overlapping ellipses (what SAM's upsampled masks look like); noisy: the blob with 10% of its
    pixels flipped at random (many short runs, the slow case for every encoder); empty / full: one run."""
    if shape == "empty":
        return np.zeros((height, width), bool)
    if shape == "full":
        return np.ones((height, width), bool)
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:height, :width]
    m = np.zeros((height, width), bool)
    for _ in range(4):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if shape == "noisy":
        m ^= rng.random((height, width)) < 0.10
    elif shape != "blob":
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    return m


def rust_encoder() -> tuple[Callable[[np.ndarray], list[int]] | None, dict]:
    """The Rust encoder as mask -> list of ints, and what was used (or why it is missing)."""
    try:
        from importlib.metadata import version

        import label_studio_brush_rle_rs as rs
    except ImportError as exc:
        return None, {"package": "label-studio-brush-rle-rs", "unavailable": f"not importable: {exc}"}

    def encode(mask: np.ndarray) -> list[int]:
        # Its input is the flattened RGBA values, given as bytes: it reads an ndarray element by element, 0.29 s
        # against 0.04 s as bytes for the 1024x1024 blob (docs/experiments.md, 2026-11-29).
        rgba = np.repeat(mask.astype(np.uint8).ravel() * np.uint8(255), 4).tobytes()
        return list(rs.encode_rle(rgba, 8, [3, 4, 8, 16]))                    # the SDK's defaults, passed explicitly

    return encode, {"package": "label-studio-brush-rle-rs", "module": "label_studio_brush_rle_rs",
                    "version": version("label-studio-brush-rle-rs")}


def timed(fn: Callable[[], list[int]], repeat: int, budget_s: float) -> tuple[float, int, list[int]]:
    """Median seconds over up to ``repeat`` runs (stopping once ``budget_s`` is spent), runs done, last output."""
    times: list[float] = []
    out: list[int] = []
    while len(times) < repeat and (not times or sum(times) < budget_s):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times), out


def main() -> None:
    from label_studio_sdk.converter.brush import mask2rle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1024x1024", "4000x3000"], help="WIDTHxHEIGHT")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a cell after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rle.json"))
    args = ap.parse_args()

    rust, rust_info = rust_encoder()
    encoders: dict[str, Callable[[np.ndarray], list[int]]] = {
        "ours": mask_to_brush_rle,
        "sdk": lambda m: mask2rle(m.astype(np.uint8) * np.uint8(255)),
    }
    if rust is not None:
        encoders["rust"] = rust
    else:
        print(f"label-studio-brush-rle-rs left out: {rust_info['unavailable']}")

    rows = []
    print("| size | shape | runs | RLE bytes | ours (ms) | SDK mask2rle (ms) | brush-rle-rs (ms) | SDK / ours "
          "| rs / ours | same bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        width, height = parse_size(size)
        for shape in args.shapes:
            mask = make_mask(shape, height, width)
            flat = mask.ravel()
            row: dict = {"size": f"{width}x{height}", "shape": shape,
                         "runs": int(np.count_nonzero(flat[1:] != flat[:-1])) + 1}
            outputs = {}
            for name, encode in encoders.items():
                median_s, runs_done, outputs[name] = timed(lambda: encode(mask), args.repeat, args.budget_s)
                row[f"{name}_ms"] = round(1000 * median_s, 3)
                row[f"{name}_repeats"] = runs_done
            reference = outputs["sdk"]
            row["rle_bytes"] = len(reference)
            row["identical"] = {name: out == reference for name, out in outputs.items() if name != "sdk"}
            row["sdk_over_ours"] = round(row["sdk_ms"] / row["ours_ms"], 1)
            if "rust" in outputs:
                row["rust_over_ours"] = round(row["rust_ms"] / row["ours_ms"], 1)
            rows.append(row)
            same = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in row["identical"].items())
            print(f"| {row['size']} | {shape} | {row['runs']} | {row['rle_bytes']} | {row['ours_ms']:.1f} "
                  f"| {row['sdk_ms']:.1f} | {row.get('rust_ms', float('nan')):.1f} | {row['sdk_over_ours']:.0f}x "
                  f"| {row.get('rust_over_ours', float('nan')):.0f}x | {same} |", flush=True)

    path = write_json(args.out, {"repeat": args.repeat, "budget_s": args.budget_s, "rust": rust_info,
                                 "timing": "end to end, 2-D mask -> list of ints; median over *_repeats runs",
                                 "rows": rows})
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
