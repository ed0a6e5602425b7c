"""``SSPSAMPredictor``: preprocessing, caches and batching around a loaded SSP-SAM (like segment-anything's
``SamPredictor``). The model stays tensors in, tensors out.

* Images are read with EXIF orientation and converted to RGB (``images.load_image``).
* Image features (the SAM image embedding and the CLIP-Surgery tokens) are cached by image content in an LRU bounded
  in bytes; a rephrased sentence on the same image re-runs only the prompt path and the mask decoder.
* Text features are cached by sentence (an LRU bounded in bytes, 32 MB by default).
* ``predict_batch`` groups pairs by image, encodes missing images and sentences in batches, then decodes in batches.
* Thread-safe: caches have a lock; the model runs under one lock (one accelerator slot per process). A picture
  whose features one thread is computing is waited for by the others, not computed twice (``prewarm``).
* Images may come as ``ImageRef`` (content key + size + a loader): when the key is cached the picture is never
  decoded. Each step is a ``ssp_sam.timing`` stage (decode, key, preprocess, sam_encoder, clip_vision, clip_text,
  decoder, upsample).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .build import LoadedModel, autocast_for, load_model
from .clicks import original_to_sam
from .data.sample import mask_to_box
from .images import ImageRef, load_image
from .options import add_model_args, model_config_from_args
from .timing import stage
from .transforms import ClipMeta, box_from_clip_frame, clip_input, frame_to_original, sam_input

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    mask: np.ndarray            # (H, W) bool at the image's natural (EXIF-transposed) size
    score: float                # mean foreground probability inside the mask; 0.0 when no target
    box_xyxy: np.ndarray        # (4,) REG-token box in original pixels
    no_target: bool             # the GRES rule: too few positive pixels in the logit frame
    frame_logits: np.ndarray    # (F, F) float32 logits in the padded SAM frame
    low_res_logits: np.ndarray | None = None   # (1, 4h, 4w) mask-decoder logits: the next interactive step's
                                                # dense prompt (``predict_interactive(mask_input=...)``)


@dataclass
class _ImageFeatures:
    embedding: torch.Tensor     # (C, h, w) SAM image embedding
    tokens: torch.Tensor        # (1+N, C) CLIP-Surgery tokens
    meta: ClipMeta
    hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.embedding.element_size() * self.embedding.nelement() + \
            self.tokens.element_size() * self.tokens.nelement()


@dataclass
class _TextFeatures:
    ids: torch.Tensor           # (L,) token ids
    words: torch.Tensor         # (L, Ct) word tokens
    sentence: torch.Tensor      # (C,) sentence embedding

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.ids, self.words, self.sentence))


@dataclass
class _Prompts:
    box: torch.Tensor           # (1, 4) REG-token box
    prompts: torch.Tensor       # (1, P, D) the sentence's prompt tokens on one picture

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.box, self.prompts))


class _InFlight:
    """An image whose features one thread is computing; the others wait for it instead of computing them again."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.features: _ImageFeatures | None = None


class ByteLRU:
    """A thread-safe LRU bounded by the sum of its values' ``nbytes``; never grows past the bound."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def peek(self, key):
        """The value, or None, without counting a hit or a miss and without refreshing it."""
        with self._lock:
            return self._items.get(key)

    def __contains__(self, key) -> bool:
        """Whether ``key`` is cached, without counting a hit or a miss and without refreshing it."""
        with self._lock:
            return key in self._items

    def put(self, key, value) -> None:
        size = value.nbytes
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes
            if size > self.max_bytes:
                return  # larger than the whole cache: do not keep it
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        return {"items": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}


class SSPSAMPredictor:
    """Sentence -> mask at the original resolution, for one loaded model."""

    def __init__(self, loaded: LoadedModel, threshold: float = 0.0, cache_bytes: int = 512 * 2**20,
                 text_cache_bytes: int = 32 * 2**20) -> None:
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.device = loaded.device
        self.threshold = float(threshold)
        self.image_cache = ByteLRU(cache_bytes)
        # text features by sentence, bounded in bytes too: one sentence's word tokens are 77 x 512 floats (158 KB)
        # for CLIP B/16, so a bound by count would let thousands of sentences take hundreds of MB
        self.text_cache = ByteLRU(text_cache_bytes)
        # the sentence's prompt tokens by (picture, sentence): the clicks of an interactive session that follow a
        # sentence re-run only SAM's prompt encoder and the mask decoder (128 x 256 floats, 128 KB, per entry for
        # the official variants)
        self.prompt_cache = ByteLRU(8 * 2**20)
        self._model_lock = threading.Lock()
        self._inflight: dict[str, _InFlight] = {}
        self._inflight_lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.loaded.version

    def _autocast(self):
        return autocast_for(self.device, self.loaded.dtype)

    # -- features -------------------------------------------------------------------------------------------------

    def has_image(self, key: str) -> bool:
        """Whether the features of the picture with this content key (``ImageRef.key``) are cached or being
        computed: then predicting on it needs no pixels."""
        with self._inflight_lock:
            if key in self._inflight:
                return True
        return key in self.image_cache

    def prewarm(self, image) -> bool:
        """Compute and cache the image features of one picture (array, ``ImageRef``, path, bytes) ahead of its first
        sentence. Returns False when they were cached already."""
        ref = self._ref(image)
        if self.has_image(ref.key):
            return False
        self._image_features([ref], 1)
        return True

    def _image_features(self, refs: list[ImageRef], batch_size: int) -> list[_ImageFeatures]:
        found: dict[str, _ImageFeatures] = {}
        mine: dict[str, int] = {}                     # key -> index of the ref this call computes it from
        waits: dict[str, _InFlight] = {}
        for i, ref in enumerate(refs):
            k = ref.key
            if k in found or k in mine or k in waits:
                continue
            f = self.image_cache.get(k)
            if f is not None:
                found[k] = f
                continue
            with self._inflight_lock:                 # another thread computing it: wait for that one
                other = self._inflight.get(k)
                if other is not None:
                    waits[k] = other
                elif (f := self.image_cache.peek(k)) is not None:   # finished since the look-up (it is cached
                    found[k] = f                                     # before it is no longer in flight)
                else:
                    self._inflight[k] = _InFlight()
                    mine[k] = i
        try:
            todo = list(mine.values())
            for start in range(0, len(todo), batch_size):
                idx = todo[start:start + batch_size]
                for feats, i in zip(self._encode_images([refs[i] for i in idx]), idx):
                    k = refs[i].key
                    self.image_cache.put(k, feats)
                    found[k] = feats
                    self._finish_inflight(k, feats)
        finally:
            for k in mine:                            # a failure: waiters compute it themselves
                self._finish_inflight(k, None)
        for k, other in waits.items():
            other.done.wait()
            if other.features is not None:
                found[k] = other.features
            else:
                found[k] = self._encode_images([next(r for r in refs if r.key == k)])[0]
                self.image_cache.put(k, found[k])
        return [found[r.key] for r in refs]

    def _finish_inflight(self, key: str, feats: _ImageFeatures | None) -> None:
        with self._inflight_lock:
            entry = self._inflight.pop(key, None)
        if entry is not None:
            entry.features = feats
            entry.done.set()

    def _encode_images(self, refs: list[ImageRef]) -> list[_ImageFeatures]:
        images = [r.pixels() for r in refs]
        with stage("preprocess"):
            sam = torch.stack([sam_input(im, self.spec.sam_image_size) for im in images]).to(self.device)
            clips, metas = zip(*(clip_input(im, self.spec.clip_image_size, "center") for im in images))
            clips = torch.stack(clips).to(self.device)
        with torch.inference_mode(), self._autocast(), self._model_lock:
            with stage("sam_encoder"):
                emb = self.model.encode_image(sam).float().cpu()
            with stage("clip_vision"):
                tok = self.model.encode_clip_image(clips).float().cpu()
        return [_ImageFeatures(emb[j].clone(), tok[j].clone(), metas[j], tuple(im.shape[:2]))
                for j, im in enumerate(images)]

    def _text_features(self, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        found: dict[str, _TextFeatures] = {}
        missing = []
        for s in dict.fromkeys(sentences):
            f = self.text_cache.get(s)
            if f is None:
                missing.append(s)
            else:
                found[s] = f
        if missing:
            with stage("clip_text"):
                ids = self.tokenizer(missing)
                with torch.inference_mode(), self._autocast(), self._model_lock:
                    words, sent = self.model.encode_text(ids.to(self.device))
                    words, sent = words.float().cpu(), sent.float().cpu()
            for i, s in enumerate(missing):     # clones: an entry must not keep the whole batch's storage alive
                found[s] = _TextFeatures(ids[i].clone(), words[i].clone(), sent[i].clone())
                self.text_cache.put(s, found[s])
        return [(found[s].ids, found[s].words, found[s].sentence) for s in sentences]

    # -- prediction -----------------------------------------------------------------------------------------------

    def predict(self, image, sentence: str) -> Prediction:
        """One image (array, ``ImageRef``, PIL image, path or bytes) and one sentence -> ``Prediction``."""
        return self.predict_batch([(image, sentence)])[0]

    @staticmethod
    def _ref(image) -> ImageRef:
        if isinstance(image, ImageRef):
            return image
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            with stage("decode"):
                image = load_image(image)
        return ImageRef.of(image)

    def predict_batch(self, pairs: Sequence[tuple[Any, str]], batch_size: int = 8) -> list[Prediction]:
        """Many (image, sentence) pairs; images shared between pairs are encoded once. An image is an RGB uint8
        array, an ``ImageRef`` (decoded only when its features are not cached), or anything ``load_image`` reads."""
        if not pairs:
            return []
        t0 = time.perf_counter()
        refs = [self._ref(im) for im, _ in pairs]
        sentences = [str(s) for _, s in pairs]
        feats = self._image_features(refs, batch_size)
        texts = self._text_features(sentences)
        results: list[Prediction] = []
        for start in range(0, len(pairs), batch_size):
            f = feats[start:start + batch_size]
            t = texts[start:start + batch_size]
            with stage("decoder"):
                emb = torch.stack([x.embedding for x in f]).to(self.device)
                tok = torch.stack([x.tokens for x in f]).to(self.device)
                ids = torch.stack([x[0] for x in t]).to(self.device)
                words = torch.stack([x[1] for x in t]).to(self.device)
                sent = torch.stack([x[2] for x in t]).to(self.device)
                with torch.inference_mode(), self._autocast(), self._model_lock:
                    out = self.model(emb, None, ids, image_tokens=tok, text_features=(words, sent))
                boxes = out.box.float().cpu()          # the copy waits for the whole forward
            with stage("upsample"), torch.inference_mode():
                logits = out.logits.float()[:, 0]
                for j, fe in enumerate(f):
                    results.append(self._finish(logits[j], boxes[j], fe))
        log.debug("predicted %d pairs in %.3f s", len(pairs), time.perf_counter() - t0)
        return results

    def predict_interactive(self, image, sentence: str | None = None, points=None, labels=None, box=None,
                            mask_input: np.ndarray | None = None) -> Prediction:
        """A sentence and/or SAM prompts on one image -> ``Prediction`` (with ``low_res_logits`` for the next step).

        ``points``: (N, 2) xy and ``box``: (x0, y0, x1, y1), continuous coordinates on the picture as
        ``load_image`` returns it (EXIF-transposed; (0, 0) its top-left corner, (W, H) its bottom-right).
        ``labels``: (N,) 1 positive / 0 negative. ``mask_input``: an earlier step's ``low_res_logits`` on the same
        picture. With a sentence, its prompt tokens and SAM's point/box tokens drive the decoder together; without
        one it is plain SAM. A sentence alone gives exactly ``predict``'s mask.
        """
        points = None if points is None or len(points) == 0 else np.asarray(points, np.float32).reshape(-1, 2)
        if not sentence and points is None and box is None:
            raise ValueError("an interactive prediction needs a sentence, a click or a box")
        if points is not None:
            labels = np.ones(len(points), np.float32) if labels is None else np.asarray(labels, np.float32)
            if labels.shape != (len(points),):
                raise ValueError(f"{len(points)} points but {labels.size} labels")
        ref = self._ref(image)
        fe = self._image_features([ref], 1)[0]
        # a click after the sentence finds the sentence's prompt tokens cached: no text features needed then
        cached = self.prompt_cache.get((ref.key, str(sentence))) if sentence else None
        text = self._text_features([str(sentence)])[0] if sentence and cached is None else None
        size = self.spec.sam_image_size
        with stage("decoder"):
            dev = self.device
            pts = bx = mi = None
            if points is not None:
                pts = (torch.from_numpy(original_to_sam(points, fe.hw, size))[None].to(dev),
                       torch.from_numpy(labels)[None].to(dev))
            if box is not None:
                corners = original_to_sam(np.asarray(box, np.float32).reshape(2, 2), fe.hw, size)
                bx = torch.from_numpy(corners.reshape(1, 4)).to(dev)
            if mask_input is not None:
                mi = torch.as_tensor(np.asarray(mask_input, np.float32)).reshape(1, 1, *np.shape(mask_input)[-2:])
                mi = mi.to(dev)
            with torch.inference_mode(), self._autocast(), self._model_lock:
                emb = fe.embedding[None].to(dev)
                prompts = reg_box = None
                if cached is not None:
                    reg_box, prompts = cached.box.to(dev), cached.prompts.to(dev)
                elif text is not None:
                    reg_box, prompts = self._sentence_prompts(ref.key, str(sentence), fe, text)
                low = self.model.decode_masks(emb, prompts, points=pts, boxes=bx, mask_input=mi)
                logits = self.model.postprocess_logits(low).float()[0, 0]
        with stage("upsample"), torch.inference_mode():
            pred = self._finish(logits, None if reg_box is None else reg_box[0].float().cpu(), fe)
        pred.low_res_logits = low[0].float().cpu().numpy()
        return pred

    def _sentence_prompts(self, image_key: str, sentence: str, fe: _ImageFeatures, text
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(REG box (1, 4), prompt tokens (1, P, D)) of a sentence on a picture, computed and kept in
        ``prompt_cache`` for the clicks that follow."""
        ids, words, sent = (t[None].to(self.device) for t in text)
        box, prompts, _ = self.model.encode_prompts(ids, image_tokens=fe.tokens[None].to(self.device),
                                                    text_features=(words, sent))
        self.prompt_cache.put((image_key, sentence), _Prompts(box.float().cpu(), prompts.float().cpu()))
        return box, prompts

    def _finish(self, frame_logits: torch.Tensor, box: torch.Tensor | None, fe: _ImageFeatures) -> Prediction:
        """Logits in the padded frame (on the model's device) -> the mask at the original size. The upsampling and
        the threshold run where the logits are; only the boolean mask and the small frame come back to the host.
        ``box``: the REG token's (None without a sentence: the mask's own bounding box)."""
        positive = frame_logits > self.threshold
        n_positive = int(positive.sum())
        no_target = n_positive < self.spec.no_target_min_pixels
        box_xyxy = box_from_clip_frame(box.tolist(), fe.meta, fe.hw) if box is not None else None
        if no_target:
            mask = np.zeros(fe.hw, dtype=bool)
            score = 0.0
        else:
            full = frame_to_original(frame_logits, fe.hw, self.spec.sam_image_size)
            mask = (full > self.threshold).cpu().numpy()
            score = float(torch.sigmoid(frame_logits[positive]).mean())
            if not mask.any():  # a tiny object lost in the resize back: report it as no target
                no_target, score = True, 0.0
        if box_xyxy is None:
            box = mask_to_box(mask)
            box_xyxy = box if box is not None else np.zeros(4, dtype=np.float32)
        return Prediction(mask=mask, score=score, box_xyxy=box_xyxy, no_target=no_target,
                          frame_logits=frame_logits.cpu().numpy().astype(np.float32, copy=False))

    def cache_stats(self) -> dict[str, Any]:
        return {"image_cache": self.image_cache.stats(), "text_cache": self.text_cache.stats(),
                "prompt_cache": self.prompt_cache.stats()}


# ----------------------------------------------------------------------------------------------------------------
# CLI: ssp-sam predict IMAGE "sentence" --out overlay.png


def overlay(image: np.ndarray, mask: np.ndarray, box: Iterable[float] | None = None,
            color=(255, 40, 40), alpha: float = 0.5):
    """An RGB picture with the mask tinted and its outline and box drawn (PIL image)."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(color, dtype=np.float32)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if box is not None:
        ImageDraw.Draw(pil).rectangle([float(v) for v in box], outline=(255, 255, 0), width=2)
    return pil


def _cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    image = load_image(args.image)
    predictor = SSPSAMPredictor(load_model(model_config_from_args(args)), threshold=args.threshold)
    p = predictor.predict(image, args.sentence)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, p.mask, None if p.no_target else p.box_xyxy).save(out)
    mask_path = Path(args.mask) if args.mask else out.with_name(out.stem + "_mask.png")
    Image.fromarray((p.mask * 255).astype(np.uint8)).save(mask_path)
    state = "no target" if p.no_target else f"{int(p.mask.sum())} px"
    print(f"{args.sentence!r}: {state}, score {p.score:.3f}, box {np.round(p.box_xyxy, 1).tolist()}")
    print(f"wrote {out} and {mask_path} (model {predictor.version})")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("predict", help="segment the object a sentence refers to; writes a mask and an overlay")
    p.add_argument("image")
    p.add_argument("sentence")
    p.add_argument("--out", default="overlay.png", help="overlay picture (PNG)")
    p.add_argument("--mask", default=None, help="mask PNG (default: <out>_mask.png)")
    p.add_argument("--threshold", type=float, default=0.0, help="logit threshold (0 = probability 0.5)")
    add_model_args(p)
    p.set_defaults(func=_cmd_predict)
