"""Datasets that yield :class:`ssp_sam.data.Sample`.

1. ``OfficialRefDataset``: the official SimREC-style layout (what the official data preparation writes)::

       ROOT/anns/<refcoco|refcoco+|refcocog_umd|refcocog_google|refclef|grefcoco>.json   {split: [record, ...]}
       ROOT/masks/<same name>/<mask_id>.npy                                               uint8 HxW
       IMAGES/train2014/COCO_train2014_%012d.jpg     (COCO-based)   IMAGES/images/%d.jpg  (ReferIt / refclef)

   Records: ``iid``, ``bbox`` (COCO xywh; xyxy for gRefCOCO), ``cat_id``, ``refs`` (sentences), ``mask_id``.
   The train split gives one item per record (object) and draws one of its sentences at random on every load;
   other splits give one item per sentence.

2. ``JsonlDataset``: a team's own data, one JSON object per line::

       {"image": "images/0001.jpg",                 # path relative to the .jsonl file (or absolute)
        "sentence": "the red car on the left",
        "mask": "masks/0001.png"                    # PNG/JPG (> 0 is foreground) or .npy, relative like "image"
              | {"rle": [...], "height": H, "width": W}   # Label Studio brush RLE (label_studio_sdk decode_rle)
              | {"counts": ..., "size": [H, W]}            # COCO RLE (list or compressed string)
              | null,                                       # no target (empty mask)
        "box_xyxy": [x0, y0, x1, y1],               # optional (derived from the mask when absent)
        "meta": {...}}                              # optional

   ``write_jsonl`` writes this format from Samples (``ssp-sam synth`` uses it too).

3. ``load_dataset(spec)``: one string names any of them (the ``--train-data`` / ``--val-data`` options):
   ``synthetic:N[:seed=S][:domain=D]``, ``path/to/file.jsonl``, ``official:ROOT:DATASET:SPLIT[:images=DIR]``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ssp_sam.data.masks import brush_rle_to_mask, coco_rle_to_mask
from ssp_sam.data.sample import Sample, mask_to_box
from ssp_sam.io import atomic_write
from ssp_sam.images import image_digest, load_image

ANN_FILES = {  # accepted dataset names -> annotation file stem (official VGDataset keys and file names)
    "refcoco": "refcoco", "unc": "refcoco", "refcoco+": "refcoco+", "unc+": "refcoco+",
    "refcocog_umd": "refcocog_umd", "gref_umd": "refcocog_umd", "refcocog_google": "refcocog_google",
    "gref": "refcocog_google", "refclef": "refclef", "referit": "refclef", "grefcoco": "grefcoco",
}
XYXY_DATASETS = {"grefcoco"}
REFERIT_DATASETS = {"refclef"}


def _read_image(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    return load_image(path)


def _file_safe(key: Any) -> str:
    return str(key).replace("/", "__").replace("\\", "__")


def image_key(sample: Sample) -> str:
    """A stable file-name-safe key of a sample's image (for embedding caches): ``meta["image_key"]`` or a hash."""
    key = sample.meta.get("image_key")
    if key:
        return _file_safe(key)
    return image_digest(sample.image)[:20]


# ----------------------------------------------------------------------------------------------------------------------
# Official layout


class OfficialRefDataset:
    """RefCOCO / RefCOCO+ / RefCOCOg / ReferIt / gRefCOCO in the official preprocessed layout (see module doc)."""

    def __init__(self, root: str | os.PathLike, dataset: str, split: str, image_root: str | os.PathLike | None = None,
                 train: bool | None = None, seed: int = 0, ann_file: str | os.PathLike | None = None,
                 mask_dir: str | os.PathLike | None = None) -> None:
        if dataset not in ANN_FILES and ann_file is None:
            raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(ANN_FILES))}")
        self.name = ANN_FILES.get(dataset, dataset)
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root else self.root
        ann_path = Path(ann_file) if ann_file else self.root / "anns" / f"{self.name}.json"
        if not ann_path.exists():
            raise FileNotFoundError(f"annotation file not found: {ann_path}")
        with open(ann_path) as f:
            anns = json.load(f)
        if split not in anns:
            raise KeyError(f"{ann_path} has no split {split!r}; it has {', '.join(anns)}")
        self.mask_dir = Path(mask_dir) if mask_dir else self.root / "masks" / self.name
        self.split = split
        self.train = split == "train" if train is None else train
        self.rng = random.Random(seed)
        records = anns[split]
        if self.train:  # one item per object; a sentence is drawn on each load
            self.items = [(r, None) for r in records if r.get("refs")]
        else:           # one item per sentence
            self.items = [(r, k) for r in records for k in range(len(r.get("refs", [])))]

    def __len__(self) -> int:
        return len(self.items)

    def _image_key(self, rec: dict[str, Any]) -> str:
        return f"{self.name}/{self.image_path(rec['iid']).stem}"

    def image_path(self, iid: int | str) -> Path:
        if self.name in REFERIT_DATASETS:
            return self.image_root / "images" / f"{iid}.jpg"
        return self.image_root / "train2014" / f"COCO_train2014_{int(iid):012d}.jpg"

    def __getitem__(self, i: int) -> Sample:
        rec, k = self.items[i]
        refs = rec["refs"]
        k = self.rng.randrange(len(refs)) if k is None else k
        sentence = refs[k]["sent"] if isinstance(refs[k], dict) else str(refs[k])
        img_path = self.image_path(rec["iid"])
        image = _read_image(img_path)
        mask_path = self.mask_dir / f"{rec['mask_id']}.npy"
        if not mask_path.exists():
            raise FileNotFoundError(f"mask not found: {mask_path}")
        mask = (np.load(mask_path) > 0).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask {mask.shape} does not match image {image.shape[:2]} ({img_path})")
        box = None
        if mask.any():
            b = [float(v) for v in rec.get("bbox", [0, 0, 0, 0])]
            box = np.array(b if self.name in XYXY_DATASETS else [b[0], b[1], b[0] + b[2], b[1] + b[3]], np.float32)
            if box[2] <= box[0] or box[3] <= box[1]:
                box = mask_to_box(mask)
        meta = {"kind": "none" if not mask.any() else "ref", "dataset": self.name, "split": self.split,
                "iid": rec["iid"], "mask_id": rec["mask_id"], "cat_id": rec.get("cat_id"),
                "image_key": self._image_key(rec)}
        return Sample(image=image, sentence=sentence, mask=mask, box_xyxy=box, meta=meta)


# ----------------------------------------------------------------------------------------------------------------------
# JSON lines


def decode_mask_field(value: Any, base: Path, hw: tuple[int, int]) -> np.ndarray:
    """The ``mask`` field of a JSON-lines record -> uint8 (H, W) {0, 1}."""
    h, w = hw
    if value is None:
        return np.zeros((h, w), np.uint8)
    if isinstance(value, str):
        p = Path(value) if os.path.isabs(value) else base / value
        if not p.exists():
            raise FileNotFoundError(f"mask not found: {p}")
        if p.suffix == ".npy":
            m = np.load(p)
        else:
            from PIL import Image

            with Image.open(p) as im:
                m = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
        m = (np.asarray(m) > 0).astype(np.uint8)
    elif isinstance(value, dict) and "rle" in value:
        m = brush_rle_to_mask(value["rle"], int(value.get("height", h)), int(value.get("width", w))).astype(np.uint8)
    elif isinstance(value, dict) and "counts" in value:
        m = coco_rle_to_mask(value)
    else:
        raise ValueError(f"unsupported mask value {str(value)[:80]!r}")
    if m.shape != (h, w):
        raise ValueError(f"mask {m.shape} does not match image {(h, w)}")
    return m


class JsonlDataset:
    """A team's own data in the JSON-lines format (module doc). Images are read on access (``cache`` keeps them)."""

    def __init__(self, path: str | os.PathLike, cache: bool = False) -> None:
        self.path = Path(path)
        self.base = self.path.parent
        self.records: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{n}: not JSON: {e}") from None
                for key in ("image", "sentence"):
                    if key not in rec:
                        raise ValueError(f"{self.path}:{n}: missing field {key!r}")
                self.records.append(rec)
        self._cache: dict[int, Sample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _image_key(rec: dict[str, Any]) -> str:
        """The record's ``meta.image_key``, else its image path without the suffix."""
        meta = rec.get("meta") or {}
        return meta["image_key"] if "image_key" in meta else str(Path(rec["image"]).with_suffix(""))

    def __getitem__(self, i: int) -> Sample:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        rec = self.records[i]
        img_path = Path(rec["image"]) if os.path.isabs(rec["image"]) else self.base / rec["image"]
        image = _read_image(img_path)
        mask = decode_mask_field(rec.get("mask"), self.base, image.shape[:2])
        box = rec.get("box_xyxy") if mask.any() else None
        meta = {"kind": "none" if not mask.any() else "ref", **dict(rec.get("meta") or {})}
        meta["image_key"] = self._image_key(rec)
        s = Sample(image=image, sentence=str(rec["sentence"]), mask=mask,
                   box_xyxy=None if box is None else np.asarray(box, np.float32), meta=meta)
        if self._cache is not None:
            self._cache[i] = s
        return s


def write_jsonl(samples: Iterable[Sample], out_dir: str | os.PathLike, name: str = "annotations.jsonl",
                total: int | None = None, progress: bool = False) -> Path:
    """Write Samples as PNG images and masks plus a JSON-lines file (written atomically); returns the file's path."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    path = out / name
    with atomic_write(path, "w", encoding="utf-8") as f:
        for k, s in enumerate(tqdm(samples, total=total, desc="write", unit="sample", disable=not progress)):
            stem = f"{k:07d}"
            Image.fromarray(s.image).save(out / "images" / f"{stem}.png")
            Image.fromarray((s.mask > 0).astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
            rec = {"image": f"images/{stem}.png", "sentence": s.sentence, "mask": f"masks/{stem}.png",
                   "box_xyxy": None if s.box_xyxy is None else [float(v) for v in s.box_xyxy],
                   "meta": _jsonable(s.meta)}
            f.write(json.dumps(rec) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------------------------------------------------
# One string -> a dataset


def load_dataset(spec: str, train: bool = False, progress: bool = False):
    """``synthetic:N[:seed=S][:domain=D][:kinds=K=W,...]`` | ``file.jsonl`` |
    ``official:ROOT:DATASET:SPLIT[:images=DIR]``."""
    if spec.startswith("synthetic:"):
        from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

        parts = spec.split(":")[1:]
        n, opts = int(parts[0]), dict(p.split("=", 1) for p in parts[1:])
        known = ("seed", "domain", "min_size", "max_size", "kinds")
        unknown = set(opts) - set(known)
        if unknown:
            raise ValueError(f"{spec}: unknown options {sorted(unknown)} ({', '.join(known)})")
        extra = {}
        if "kinds" in opts:  # kinds=attr=0.2,abs_pos=0.3,...: the sentence-kind mix (training data only)
            try:
                extra["kind_weights"] = {k: float(v) for k, v in (kv.split("=", 1) for kv in opts["kinds"].split(","))}
            except ValueError:
                raise ValueError(f"{spec}: kinds must read kinds=KIND=WEIGHT,KIND=WEIGHT,...") from None
        cfg = SyntheticConfig(domain=opts.get("domain", "base"), min_size=int(opts.get("min_size", 96)),
                              max_size=int(opts.get("max_size", 160)), **extra)
        return SyntheticDataset(n, seed=int(opts.get("seed", 0)), config=cfg, progress=progress)
    if spec.startswith("official:"):
        parts = spec.split(":")
        if len(parts) < 4:
            raise ValueError(f"{spec}: expected official:ROOT:DATASET:SPLIT[:images=DIR]")
        opts = dict(p.split("=", 1) for p in parts[4:])
        return OfficialRefDataset(parts[1], parts[2], parts[3], image_root=opts.get("images"), train=train)
    if spec.endswith(".jsonl") or spec.endswith(".json"):
        return JsonlDataset(spec)
    raise ValueError(f"cannot tell what dataset {spec!r} is: use synthetic:N, a .jsonl file or official:ROOT:DS:SPLIT")


__all__ = ["OfficialRefDataset", "JsonlDataset", "write_jsonl", "load_dataset", "decode_mask_field", "image_key"]
