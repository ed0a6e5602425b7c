"""A seeded synthetic referring-segmentation benchmark: shape scenes, masks and referring sentences.

Every sample is a pure function of ``(seed, index, config)`` (``numpy.random.default_rng([seed, index])``), so a
dataset of any size can be regenerated, split or extended without storing it.

Scenes hold 1-6 non-overlapping objects, each with a shape, a colour, a size (small / large) and a texture, on a flat,
gradient or noise background. Sentence kinds (``meta["kind"]``):

=========  ==================================================  ==========================
kind       example                                             target
=========  ==================================================  ==========================
attr       "the small striped circle"                          one object
abs_pos    "the square on the left", "the star in the top right" one object
rel_pos    "the red circle left of the blue square"            one object
ordinal    "the second square from the left"                   one object
multi      "all red shapes", "both circles"                    union of >= 2 objects
none       "the green star" (no green star in the scene)       empty mask
=========  ==================================================  ==========================

Domains: ``base`` (what the demo model trains on), ``novel`` (shapes, colours and a texture never seen in ``base``:
hexagon / cross / ring, purple / orange / pink / cyan, checkered) and ``mixed`` (both). Every word any domain can
produce is in :data:`SYNTHETIC_VOCABULARY`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ssp_sam.data.sample import Sample, mask_to_box

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Attributes of each domain

BASE_SHAPES = ("circle", "square", "triangle", "star", "ellipse", "diamond")
NOVEL_SHAPES = ("hexagon", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "ellipse": "ellipses", "diamond": "diamonds", "hexagon": "hexagons", "cross": "crosses",
           "ring": "rings", "shape": "shapes"}
BASE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 205, 35)}
NOVEL_COLOURS = {"purple": (135, 55, 200), "orange": (245, 135, 25), "pink": (245, 130, 195),
                 "cyan": (40, 205, 215)}
BASE_TEXTURES = ("solid", "striped", "dotted")
NOVEL_TEXTURES = ("checkered",)
SIZES = ("small", "large")
BACKGROUNDS = ("flat", "gradient", "noise")
KINDS = ("attr", "abs_pos", "rel_pos", "ordinal", "multi", "none")
ATTRS = ("size", "colour", "texture", "shape")  # the word order of a noun phrase

DOMAINS: dict[str, dict[str, Any]] = {
    "base": {"shapes": BASE_SHAPES, "colours": tuple(BASE_COLOURS), "textures": BASE_TEXTURES},
    "novel": {"shapes": NOVEL_SHAPES, "colours": tuple(NOVEL_COLOURS), "textures": BASE_TEXTURES + NOVEL_TEXTURES},
    "mixed": {"shapes": BASE_SHAPES + NOVEL_SHAPES, "colours": tuple(BASE_COLOURS) + tuple(NOVEL_COLOURS),
              "textures": BASE_TEXTURES + NOVEL_TEXTURES},
}
COLOURS = {**BASE_COLOURS, **NOVEL_COLOURS}

PREFIXES = ("", "", "", "", "", "find", "select", "segment")  # "" most of the time
ABS_PHRASES = {  # direction -> (score of an object: higher = more that way, phrases)
    "left": ("on the left", "leftmost"),
    "right": ("on the right", "rightmost"),
    "top": ("at the top", "topmost"),
    "bottom": ("at the bottom", "bottommost"),
    "top left": ("in the top left",),
    "top right": ("in the top right",),
    "bottom left": ("in the bottom left",),
    "bottom right": ("in the bottom right",),
}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
ORDINALS = ("first", "second", "third")
ORDINAL_DIRS = {"left": (1, 0), "right": (-1, 0), "top": (0, 1), "bottom": (0, -1)}  # sort key sign per axis


def _vocabulary() -> list[str]:
    words: set[str] = {"the", "all", "both", "shape", "shapes", "of", "from", "on", "at", "in"}
    words |= set(PREFIXES) - {""}
    words |= set(PLURALS) | set(PLURALS.values()) | set(COLOURS) | set(BASE_TEXTURES + NOVEL_TEXTURES) | set(SIZES)
    for phrases in ABS_PHRASES.values():
        for p in phrases:
            words |= set(p.split())
    for r in RELATIONS:
        words |= set(r.split())
    words |= set(ORDINALS) | set(ORDINAL_DIRS)
    return sorted(words)


SYNTHETIC_VOCABULARY: list[str] = _vocabulary()
"""Every word any synthetic sentence (any domain) can contain, lower case, sorted."""


@dataclass
class SyntheticConfig:
    """Knobs of the generator. The defaults are the benchmark the demo model is trained and evaluated on."""

    domain: str = "base"
    min_size: int = 96                       # image side range in pixels (height and width drawn independently
    max_size: int = 160                      # unless the image is square)
    square_prob: float = 0.5
    min_objects: int = 1
    max_objects: int = 6
    kind_weights: dict[str, float] = field(default_factory=lambda: {
        "attr": 0.30, "abs_pos": 0.14, "rel_pos": 0.10, "ordinal": 0.08, "multi": 0.14, "none": 0.24})
    pixel_noise: float = 3.0                 # std of Gaussian noise added to the whole image

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown synthetic domain {self.domain!r}; choose one of {sorted(DOMAINS)}")
        unknown = set(self.kind_weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown sentence kinds {sorted(unknown)}; choose among {KINDS}")
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError("need 1 <= min_objects <= max_objects <= 6")


# ----------------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Obj:
    shape: str
    colour: str
    size: str
    texture: str
    cx: float
    cy: float
    r: float
    mask: np.ndarray | None = None

    def attr(self, name: str) -> str:
        return getattr(self, name)


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float,
                angle: float) -> np.ndarray:
    """Boolean mask of one shape of radius ~r centred at (cx, cy) on the coordinate grids xx, yy."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.55 * r)) ** 2 <= 1.0
    if shape == "square":
        s = 0.82 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) / (0.8 * r) + np.abs(dy) / r <= 1.0
    if shape == "cross":
        a, b = 0.32 * r, 0.95 * r
        return ((np.abs(dx) <= a) & (np.abs(dy) <= b)) | ((np.abs(dy) <= a) & (np.abs(dx) <= b))
    if shape in ("triangle", "hexagon"):
        n, start = (3, -np.pi / 2) if shape == "triangle" else (6, angle)
        rr = r if shape == "hexagon" else 1.08 * r
        inside = np.ones_like(dx, dtype=bool)
        verts = [(rr * np.cos(start + 2 * np.pi * k / n), rr * np.sin(start + 2 * np.pi * k / n)) for k in range(n)]
        if shape == "triangle":  # centre the triangle's bounding box on (cx, cy)
            shift = (rr - rr * 0.5) / 2
            verts = [(x, y - shift) for x, y in verts]
        for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
            inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0  # left of each edge (clockwise in image)
        return inside
    if shape == "star":
        theta = np.arctan2(dy, dx) + np.pi / 2 + angle
        t = (theta * 5 / (2 * np.pi)) % 1.0
        tri = np.abs(2 * t - 1)  # 1 at the tips, 0 in the valleys
        return np.sqrt(dx * dx + dy * dy) <= r * (0.45 + 0.55 * tri)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean map of the pixels drawn in the darker shade."""
    if texture == "solid":
        return np.zeros_like(xx, dtype=bool)
    p = float(rng.uniform(4.0, 6.5))
    if texture == "striped":
        a = rng.choice([np.pi / 4, -np.pi / 4, 0.0, np.pi / 2])
        return ((xx * np.cos(a) + yy * np.sin(a)) / (p / 2)) % 2 < 1
    if texture == "dotted":
        u, v = xx % p - p / 2, yy % p - p / 2
        return u * u + v * v <= (p / 3.2) ** 2
    if texture == "checkered":
        return ((xx // (p * 0.7)).astype(int) + (yy // (p * 0.7)).astype(int)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _background(h: int, w: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Low-saturation background (float32 HxWx3) so the object colours stay readable."""
    def grey() -> np.ndarray:
        g = rng.uniform(70, 200)
        return np.clip(g + rng.uniform(-12, 12, 3), 0, 255)

    if kind == "flat":
        return np.broadcast_to(grey(), (h, w, 3)).astype(np.float32).copy()
    if kind == "gradient":
        c0, c1 = grey(), grey()
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    if kind == "noise":
        cell = int(rng.integers(3, 9))
        small = rng.normal(0, rng.uniform(8, 22), (h // cell + 2, w // cell + 2, 1)).astype(np.float32)
        noise = np.repeat(np.repeat(small, cell, 0), cell, 1)[:h, :w]
        return np.clip(grey() + noise, 0, 255).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _place_objects(h: int, w: int, n: int, dom: dict[str, Any], rng: np.random.Generator) -> list[_Obj]:
    """Non-overlapping objects with attributes drawn from small per-scene pools (so repeats are common)."""
    m = min(h, w)
    pools = {
        "shape": list(rng.choice(dom["shapes"], size=min(len(dom["shapes"]), int(rng.integers(1, 4))), replace=False)),
        "colour": list(rng.choice(dom["colours"], size=min(len(dom["colours"]), int(rng.integers(1, 4))),
                                  replace=False)),
        "texture": list(rng.choice(dom["textures"], size=min(len(dom["textures"]), int(rng.integers(1, 3))),
                                   replace=False)),
        "size": list(SIZES),
    }
    objs: list[_Obj] = []
    for _ in range(n):
        for _attempt in range(40):
            size = str(rng.choice(pools["size"]))
            r = m * (rng.uniform(0.085, 0.11) if size == "small" else rng.uniform(0.15, 0.19))
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (1.08 * (r + o.r) + 2) ** 2 for o in objs):
                objs.append(_Obj(str(rng.choice(pools["shape"])), str(rng.choice(pools["colour"])), size,
                                 str(rng.choice(pools["texture"])), float(cx), float(cy), float(r)))
                break
    return objs


def render_scene(h: int, w: int, objs: list[_Obj], rng: np.random.Generator, background: str,
                 pixel_noise: float) -> np.ndarray:
    """Draw the objects (filling ``obj.mask``) and return the uint8 image."""
    img = _background(h, w, background, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for o in objs:
        o.mask = _shape_mask(o.shape, xx, yy, o.cx, o.cy, o.r, float(rng.uniform(0, np.pi / 3)))
        base = np.clip(np.array(COLOURS[o.colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
        shade = base * 0.55
        dark = _texture(o.texture, xx, yy, rng)
        colour = np.where(dark[..., None], shade, base)
        img = np.where(o.mask[..., None], colour, img)
    if pixel_noise > 0:
        img = img + rng.normal(0, pixel_noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Sentences


def _matches(objs: Sequence[_Obj], desc: dict[str, str]) -> list[int]:
    return [i for i, o in enumerate(objs) if all(o.attr(k) == v for k, v in desc.items())]


def _noun_phrase(desc: dict[str, str], plural: bool = False) -> str:
    words = [desc[a] for a in ("size", "colour", "texture") if a in desc]
    noun = desc.get("shape", "shape")
    words.append(PLURALS[noun] if plural else noun)
    return " ".join(words)


def _descs_of(o: _Obj) -> list[dict[str, str]]:
    """All attribute subsets describing object o (including the empty one)."""
    out = []
    for k in range(len(ATTRS) + 1):
        for combo in itertools.combinations(ATTRS, k):
            out.append({a: o.attr(a) for a in combo})
    return out


def _pick(rng: np.random.Generator, items: list[Any], weights: Sequence[float] | None = None) -> Any:
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _short_weights(descs: list[dict[str, str]]) -> list[float]:
    return [1.0 / (1 + len(d)) for d in descs]  # prefer short descriptions, like people do


def _kind_attr(objs, h, w, rng):
    t = int(rng.integers(len(objs)))
    uniq = [d for d in _descs_of(objs[t]) if _matches(objs, d) == [t] and (d or len(objs) == 1)]
    if not uniq:
        return None
    d = _pick(rng, uniq, _short_weights(uniq))
    return f"the {_noun_phrase(d)}", [t], {"desc": d}


def _kind_abs_pos(objs, h, w, rng):
    m = min(h, w)
    direction = _pick(rng, list(ABS_PHRASES))
    sx = -1 if "left" in direction else (1 if "right" in direction else 0)
    sy = -1 if "top" in direction else (1 if "bottom" in direction else 0)
    score = [sx * o.cx / w + sy * o.cy / h for o in objs]
    t = int(rng.integers(len(objs)))
    options = []
    for d in _descs_of(objs[t]):
        cand = _matches(objs, d)
        if len(cand) >= 2:
            best = sorted(cand, key=lambda i: -score[i])
            margin = (score[best[0]] - score[best[1]]) * m
            if best[0] == t and margin >= 0.1 * m:
                options.append(d)
        elif len(cand) == 1 and d:
            o = objs[t]
            in_x = sx == 0 or (o.cx < 0.33 * w if sx < 0 else o.cx > 0.67 * w)
            in_y = sy == 0 or (o.cy < 0.33 * h if sy < 0 else o.cy > 0.67 * h)
            if in_x and in_y:
                options.append(d)
    if not options:
        return None
    multi = [d for d in options if len(_matches(objs, d)) >= 2]
    d = _pick(rng, multi if multi and rng.random() < 0.8 else options)
    phrase = _pick(rng, list(ABS_PHRASES[direction]))
    text = f"the {phrase} {_noun_phrase(d)}" if phrase.endswith("most") else f"the {_noun_phrase(d)} {phrase}"
    return text, [t], {"desc": d, "direction": direction}


def _kind_rel_pos(objs, h, w, rng):
    if len(objs) < 2:
        return None
    m = min(h, w)
    b = int(rng.integers(len(objs)))
    anchors = [d for d in _descs_of(objs[b]) if d and _matches(objs, d) == [b]]
    if not anchors:
        return None
    relation = _pick(rng, list(RELATIONS))
    ax, ay = RELATIONS[relation]

    def v(i: int) -> float:  # > 0: i is on the relation's side of b
        return (objs[i].cx - objs[b].cx) * ax + (objs[i].cy - objs[b].cy) * ay

    targets = [i for i in range(len(objs)) if i != b and v(i) > 0.06 * m]
    if not targets:
        return None
    t = _pick(rng, targets)
    options = []
    for d in _descs_of(objs[t]):
        cand = [i for i in _matches(objs, d) if i != b]
        if not d or any(0 <= v(i) <= 0.06 * m for i in cand):
            continue  # an ambiguous neighbour
        if [i for i in cand if v(i) > 0] == [t]:
            options.append(d)
    if not options:
        return None
    multi = [d for d in options if len(_matches(objs, d)) >= 2]
    d = _pick(rng, multi if multi and rng.random() < 0.7 else options, None)
    da = _pick(rng, anchors, _short_weights(anchors))
    return (f"the {_noun_phrase(d)} {relation} the {_noun_phrase(da)}", [t],
            {"desc": d, "anchor": int(b), "anchor_desc": da, "relation": relation})


def _kind_ordinal(objs, h, w, rng):
    m = min(h, w)
    direction = _pick(rng, list(ORDINAL_DIRS))
    sx, sy = ORDINAL_DIRS[direction]
    key = [sx * o.cx + sy * o.cy for o in objs]
    t = int(rng.integers(len(objs)))
    options = []
    for d in _descs_of(objs[t]):
        cand = sorted(_matches(objs, d), key=lambda i: key[i])
        if len(cand) < 2 or (not d and len(objs) < 2):
            continue
        k = cand.index(t)
        if k > 2:
            continue
        gaps = np.diff([key[i] for i in cand[: k + 2]])
        if len(gaps) and gaps.min() >= 0.08 * m:
            options.append((d, k))
    if not options:
        return None
    d, k = _pick(rng, options)
    return (f"the {ORDINALS[k]} {_noun_phrase(d)} from the {direction}", [t],
            {"desc": d, "direction": direction, "ordinal": k + 1})


def _kind_multi(objs, h, w, rng):
    t = int(rng.integers(len(objs)))
    options = [d for d in _descs_of(objs[t]) if d and len(_matches(objs, d)) >= 2]
    if not options:
        return None
    d = _pick(rng, options, _short_weights(options))
    idx = _matches(objs, d)
    if len(idx) == 2 and rng.random() < 0.4:
        return f"both {_noun_phrase(d, plural=True)}", idx, {"desc": d}
    article = "all the" if rng.random() < 0.3 else "all"
    return f"{article} {_noun_phrase(d, plural=True)}", idx, {"desc": d}


def _kind_none(objs, h, w, rng, dom):
    present = {a: {o.attr(a) for o in objs} for a in ATTRS}
    for _ in range(30):
        if rng.random() < 0.5:  # an absent shape or colour ("the star" with no star)
            a = _pick(rng, ["shape", "colour"])
            absent = [v for v in dom[a + "s"] if v not in present[a]]
            if not absent:
                continue
            d = {a: _pick(rng, absent)}
            if a == "colour" and rng.random() < 0.5:
                d["shape"] = _pick(rng, sorted(present["shape"]))
        else:  # an absent combination of present attributes ("the green star" with a green square and a red star)
            n_attr = int(rng.integers(2, 4))
            attrs = list(rng.choice(ATTRS, size=n_attr, replace=False))
            if "shape" not in attrs and rng.random() < 0.7:
                attrs[-1] = "shape"
            d = {a: _pick(rng, sorted(present[a])) for a in attrs}
        if _matches(objs, d):
            continue
        if rng.random() < 0.2:
            return f"all {_noun_phrase(d, plural=True)}", [], {"desc": d}
        return f"the {_noun_phrase(d)}", [], {"desc": d}
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Public API


_KIND_FNS = {"attr": _kind_attr, "abs_pos": _kind_abs_pos, "rel_pos": _kind_rel_pos, "ordinal": _kind_ordinal,
             "multi": _kind_multi}


def _sentence(kind: str, objs: list[_Obj], h: int, w: int, dom: dict[str, Any], rng: np.random.Generator):
    fn = _KIND_FNS.get(kind)
    res = fn(objs, h, w, rng) if fn else _kind_none(objs, h, w, rng, dom)
    if res is None:
        return None
    sentence, targets, info = res
    prefix = _pick(rng, list(PREFIXES))
    return (f"{prefix} {sentence}" if prefix else sentence), targets, info, kind


def generate_sample(seed: int, index: int, config: SyntheticConfig | None = None) -> Sample:
    """The ``index``-th sample of the benchmark with this ``seed`` (deterministic)."""
    cfg = config or SyntheticConfig()
    dom = DOMAINS[cfg.domain]
    rng = np.random.default_rng([int(seed), int(index), 7919 + sorted(DOMAINS).index(cfg.domain)])
    kinds = list(cfg.kind_weights)
    kind = _pick(rng, kinds, [cfg.kind_weights[k] for k in kinds])
    for attempt in range(60):
        if attempt >= 30:  # this kind is hard to satisfy with this rng stream: fall back to the most general kind
            kind = "attr"
        if rng.random() < cfg.square_prob:
            h = w = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        else:
            h, w = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
        lo = max(cfg.min_objects, 2 if kind in ("rel_pos", "ordinal", "multi") else 1)
        n = int(rng.integers(lo, max(lo, cfg.max_objects) + 1))
        objs = _place_objects(h, w, n, dom, rng)
        if len(objs) < cfg.min_objects:
            continue
        res = _sentence(kind, objs, h, w, dom, rng)
        if res is None:
            continue
        sentence, targets, info, kind = res
        background = _pick(rng, list(BACKGROUNDS))
        image = render_scene(h, w, objs, rng, background, cfg.pixel_noise)
        mask = np.zeros((h, w), np.uint8)
        for i in targets:
            mask |= objs[i].mask.astype(np.uint8)
        objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "texture": o.texture,
                    "cx": round(o.cx, 2), "cy": round(o.cy, 2), "r": round(o.r, 2)} for o in objs]
        meta = {"kind": kind, "domain": cfg.domain, "seed": int(seed), "index": int(index),
                "background": background, "targets": [int(i) for i in targets], **dict(info), "objects": objects}
        return Sample(image=image, sentence=sentence, mask=mask, box_xyxy=mask_to_box(mask), meta=meta)
    raise RuntimeError(f"could not generate synthetic sample seed={seed} index={index} kind={kind}")


def iter_samples(n: int, seed: int = 0, config: SyntheticConfig | None = None, start: int = 0) -> Iterator[Sample]:
    """Samples ``start .. start+n-1`` of the benchmark with this seed."""
    for i in range(start, start + n):
        yield generate_sample(seed, i, config)


class SyntheticDataset:
    """An indexable dataset of ``n`` synthetic samples, generated once and kept in memory (``cache=True``) or on
    access."""

    def __init__(self, n: int, seed: int = 0, config: SyntheticConfig | None = None, domain: str | None = None,
                 cache: bool = True, progress: bool = False) -> None:
        self.config = config or SyntheticConfig(**({"domain": domain} if domain else {}))
        if domain and self.config.domain != domain:
            raise ValueError(f"domain={domain!r} conflicts with config.domain={self.config.domain!r}")
        self.n, self.seed = int(n), int(seed)
        self._items: list[Sample] | None = None
        if cache:
            from tqdm import tqdm

            self._items = [generate_sample(self.seed, i, self.config)
                           for i in tqdm(range(self.n), desc="synth", unit="sample", disable=not progress)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        return self._items[i] if self._items is not None else generate_sample(self.seed, i, self.config)


def write_synthetic(out_dir: str | os.PathLike, n: int, seed: int = 0, config: SyntheticConfig | None = None,
                    progress: bool = True) -> Path:
    """Write ``n`` samples as PNG images/masks plus ``annotations.jsonl`` (the JSON-lines format of
    :mod:`ssp_sam.data.datasets`). Returns the path of the JSON-lines file."""
    from ssp_sam.data.datasets import write_jsonl

    return write_jsonl(iter_samples(n, seed, config), out_dir, total=n, progress=progress)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ssp-sam synth``."""
    p = subparsers.add_parser("synth", help="write N synthetic referring samples (PNG + annotations.jsonl)",
                              description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("-n", "--num", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default="base", choices=sorted(DOMAINS))
    p.add_argument("--min-size", type=int, default=96)
    p.add_argument("--max-size", type=int, default=160)
    p.set_defaults(func=_cli_synth)


def _cli_synth(args: argparse.Namespace) -> int:
    cfg = SyntheticConfig(domain=args.domain, min_size=args.min_size, max_size=args.max_size)
    path = write_synthetic(args.out, args.num, args.seed, cfg)
    print(f"wrote {args.num} samples to {path}")
    return 0


__all__ = ["SYNTHETIC_VOCABULARY", "SyntheticConfig", "SyntheticDataset", "generate_sample", "iter_samples",
           "write_synthetic", "register_cli", "DOMAINS", "KINDS"]
