"""``ssp-sam check-golden DIR``: numerical parity with the official implementation.

A golden folder (its layout: docs/model.md, "Parity") holds reference outputs of the official SSP-SAM
code run on deterministic synthetic weights. This check reads only that folder: it regenerates the weights by the
folder's rule (``rule.md``: a pure function of salt, key and shape), writes them in the official file formats (an
OpenAI CLIP state dict named ``CS-*.pt`` and an official SSP-SAM checkpoint with a ``model`` key), loads them through
the same loaders users use, runs every case from the raw image and raw text (plus the stored SAM image embedding:
the reference does not run SAM's image encoder), and compares each tensor with the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .build import ModelConfig, load_model
from .transforms import clip_input

_CONSTANTS = {"tf_scale": 1.0, "tf_sigma": 0.5, "logit_scale": math.log(1 / 0.07)}


def rule_tensor(key: str, shape: tuple[int, ...], salt: str) -> np.ndarray:
    """The golden weight rule (rule.md): float32 little-endian values derived from (salt, key, shape)."""
    name = key.split(".")[-1]
    if name in _CONSTANTS:
        return np.full(shape, _CONSTANTS[name], dtype=np.float64).astype("<f4")
    seed = int(hashlib.sha256((salt + key).encode("utf-8")).hexdigest()[:8], 16)
    z = np.random.RandomState(seed).standard_normal(int(np.prod(shape))).reshape(shape)
    if name == "positional_encoding_gaussian_matrix":
        v = z
    elif len(shape) >= 2:
        v = z / np.sqrt(float(np.prod(shape[1:])))
    elif name.endswith("weight"):
        v = 1.0 + 0.02 * z
    else:
        v = 0.02 * z
    return v.astype("<f4")


def write_official_files(folder: Path, out: Path, salt: str) -> tuple[Path, Path, dict[str, str]]:
    """Generate the weights and write ``CS-ViT-*.pt`` (OpenAI CLIP state dict) and ``checkpoint.pth``."""
    keys = json.loads((folder / "keys.json").read_text())
    digests = {}
    files = {}
    for part, name in (("clip", "CS-ViT-B-16.pt"), ("ssp_sam", "checkpoint.pth")):
        h = hashlib.sha256()
        state = {}
        for key, shape, _dtype in keys[part]:
            arr = rule_tensor(key, tuple(shape), salt)
            h.update(arr.tobytes(order="C"))
            state[key] = torch.from_numpy(arr.copy())
        digests[part] = h.hexdigest()
        obj = state if part == "clip" else {"model": state, "epoch": 0}
        files[part] = out / name
        torch.save(obj, files[part])
        del state, obj
    return files["clip"], files["ssp_sam"], digests


def _compare_cases(folder: Path, manifest: dict, model, tok, spec, tol: dict) -> list[dict]:
    rows: list[dict] = []
    for case in manifest["cases"]:
        ref = np.load(folder / f"{case}.npz")
        image = ref["image"]
        token_ids = tok([str(ref["text"])])
        clip_img, _meta = clip_input(image, spec.clip_image_size, "center")
        out = model(torch.from_numpy(ref["sam_embedding"]), clip_img[None], token_ids)
        got = {
            "token_ids": token_ids.numpy(),
            "clip_input": clip_img[None].numpy(),
            "box_cxcywh": out.box.numpy(),
            "sparse_prompts": out.prompts.numpy(),
            "low_res_logits": out.low_res_logits.numpy(),
            "logits": out.logits.numpy(),
        }
        for name, limit in tol.items():
            if name not in got:
                continue
            r = ref[name]
            g = got[name]
            if g.shape != r.shape:
                rows.append(dict(case=case, tensor=name, max_abs=float("inf"), tol=limit, ok=False,
                                 note=f"shape {g.shape} vs {r.shape}"))
                continue
            diff = float(np.abs(g.astype(np.float64) - r.astype(np.float64)).max()) if g.size else 0.0
            rows.append(dict(case=case, tensor=name, max_abs=diff, tol=limit, ok=diff <= limit))
        ref_logits, g_logits = ref["logits"], got["logits"]
        confident = np.abs(ref_logits) >= 1e-4
        sign_ok = bool(((ref_logits > 0) == (g_logits > 0))[confident].all())
        rows.append(dict(case=case, tensor="sign(logits)", max_abs=float(
            ((ref_logits > 0) != (g_logits > 0))[confident].sum()), tol=0, ok=sign_ok))
    return rows


def run_check(folder: str | Path, verbose: bool = True) -> tuple[bool, list[dict]]:
    """Run every case; returns (all within tolerance, rows of {case, tensor, max_abs, tol, ok})."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    tol = manifest["tolerance"]
    salt = manifest.get("salt", "")
    rows: list[dict] = []
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="ssp-sam-golden-") as tmp:
        clip_path, ckpt_path, digests = write_official_files(folder, Path(tmp), salt)
        expected = json.loads((folder / "weights_sha256.json").read_text()).get("summary", {}) \
            if (folder / "weights_sha256.json").exists() else {}
        for part in ("clip", "ssp_sam"):
            want = expected.get(f"sha256_{part}")
            if want and want != digests[part]:
                raise RuntimeError(f"weight rule reproduces the wrong {part} tensors (sha256 {digests[part]})")
        loaded = load_model(ModelConfig(variant=manifest["variant"], checkpoint=str(ckpt_path),
                                        clip_checkpoint=str(clip_path), device="cpu", dtype="fp32",
                                        with_image_encoder=False))
        model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
        rows += _compare_cases(folder, manifest, model, tok, spec, tol)
    ok = all(r["ok"] for r in rows)
    if verbose:
        print(f"{'case':<8} {'tensor':<16} {'max |diff|':>12} {'tolerance':>10}  result")
        for r in rows:
            print(f"{r['case']:<8} {r['tensor']:<16} {r['max_abs']:>12.3e} {r['tol']:>10.1e}  "
                  f"{'ok' if r['ok'] else 'FAIL'} {r.get('note', '')}")
        print("golden check:", "PASS" if ok else "FAIL")
    return ok, rows


def _cmd(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ok, _ = run_check(args.folder)
    return 0 if ok else 1


def register_cli(sub) -> None:
    p = sub.add_parser("check-golden", help="compare this implementation with the official reference outputs")
    p.add_argument("folder", help="a golden folder (manifest.json, keys.json, caseN.npz)")
    p.set_defaults(func=_cmd)


if __name__ == "__main__":
    sys.exit(_cmd(argparse.Namespace(folder=sys.argv[1])))
