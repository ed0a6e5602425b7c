"""Precompute SAM image embeddings of a dataset (``ssp-sam embed``), so training never runs the SAM image encoder.

One float32 ``.npy`` per image, named by :func:`ssp_sam.data.datasets.image_key` (several sentences of one image
share it), written atomically. Re-running skips the images already done, so an interrupted run resumes.
Training reads them with ``--embeddings-dir`` (:class:`EmbeddingStore`) when the encoder is frozen.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ssp_sam.data import Sample
from ssp_sam.data.datasets import image_key
from ssp_sam.build import ModelConfig
from ssp_sam.io import atomic_write
from ssp_sam.options import add_model_args, model_config_from_args

log = logging.getLogger(__name__)


def embedding_path(out_dir: str | os.PathLike, sample: Sample) -> Path:
    """Where the embedding of this sample's image lives."""
    return Path(out_dir) / f"{image_key(sample)}.npy"


@torch.no_grad()
def embed_dataset(model, dataset: Sequence[Sample], out_dir: str | os.PathLike, batch_size: int = 8,
                  progress: bool = True) -> dict[str, int]:
    """Write the SAM embedding of every distinct image of ``dataset`` to ``out_dir``; skips existing files.
    Returns counts ``{"written", "skipped"}``."""
    from tqdm import tqdm

    from ssp_sam.transforms import sam_input

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    device = next(model.parameters()).device
    seen: set[str] = set()
    todo: list[tuple[str, np.ndarray]] = []
    written = skipped = 0

    def flush() -> None:
        nonlocal written
        if not todo:
            return
        x = torch.stack([sam_input(img, spec.sam_image_size) for _, img in todo]).to(device)
        emb = model.encode_image(x).float().cpu().numpy()
        for (key, _), e in zip(todo, emb):
            with atomic_write(out / f"{key}.npy") as f:
                np.save(f, e)
            written += 1
        todo.clear()

    for i in tqdm(range(len(dataset)), desc="embed", unit="img", disable=not progress):
        s = dataset[i]
        key = image_key(s)
        if key in seen:
            continue
        seen.add(key)
        if (out / f"{key}.npy").exists():
            skipped += 1
            continue
        todo.append((key, s.image))
        if len(todo) >= batch_size:
            flush()
    flush()
    return {"written": written, "skipped": skipped}


class EmbeddingStore(Mapping):
    """Sample index -> cached embedding tensor, read from ``ssp-sam embed`` files on access (memory-mapped)."""

    def __init__(self, out_dir: str | os.PathLike, dataset: Sequence[Sample]) -> None:
        self.dir = Path(out_dir)
        self.dataset = dataset
        self._keys: dict[int, str] = {}

    def _key(self, i: int) -> str:
        if i not in self._keys:
            self._keys[i] = image_key(self.dataset[i])
        return self._keys[i]

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and 0 <= i < len(self.dataset) and (self.dir / f"{self._key(i)}.npy").exists()

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.dir / f"{self._key(i)}.npy"
        if not path.exists():
            raise KeyError(f"no cached embedding {path}; run `ssp-sam embed` first")
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")))

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))

    def missing(self) -> list[int]:
        """Indices whose embedding file does not exist."""
        return [i for i in range(len(self.dataset)) if i not in self]


_EMBED_MODEL = ModelConfig(variant="ssp-sam-224", strict=False)  # only its SAM weights are used


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ssp-sam embed``."""
    p = subparsers.add_parser("embed", help="precompute SAM image embeddings of a dataset (resumable)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="synthetic:N[:seed=S] | file.jsonl | official:ROOT:DATASET:SPLIT")
    p.add_argument("--out", required=True, help="output folder of .npy files")
    p.add_argument("--batch-size", type=int, default=8)
    add_model_args(p, _EMBED_MODEL)
    p.set_defaults(func=_cli_embed)


def _cli_embed(args: argparse.Namespace) -> int:
    from ssp_sam.build import load_model
    from ssp_sam.data.datasets import load_dataset

    loaded = load_model(model_config_from_args(args, _EMBED_MODEL))
    counts = embed_dataset(loaded.model, load_dataset(args.data), args.out, batch_size=args.batch_size)
    print(f"embeddings in {args.out}: {counts['written']} written, {counts['skipped']} already there")
    return 0


__all__ = ["embed_dataset", "embedding_path", "EmbeddingStore", "register_cli"]
