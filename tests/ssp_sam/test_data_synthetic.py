"""The synthetic referring benchmark: determinism, vocabulary, sentence/mask consistency, CLI."""

import json

import numpy as np
import pytest

from ssp_sam.data import Sample
from ssp_sam.data.synthetic import (DOMAINS, KINDS, SYNTHETIC_VOCABULARY, SyntheticConfig, SyntheticDataset,
                                    generate_sample, write_synthetic)


def test_deterministic_and_seed_dependent():
    a, b = generate_sample(3, 17), generate_sample(3, 17)
    assert a.sentence == b.sentence and np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    c = generate_sample(4, 17)
    assert not np.array_equal(a.image, c.image) or a.sentence != c.sentence


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_samples_are_well_formed(domain):
    cfg = SyntheticConfig(domain=domain)
    vocab = set(SYNTHETIC_VOCABULARY)
    kinds = set()
    for i in range(150):
        s = generate_sample(0, i, cfg)
        assert isinstance(s, Sample)
        h, w = s.mask.shape
        assert s.image.dtype == np.uint8 and s.image.shape == (h, w, 3) and 96 <= h <= 160 and 96 <= w <= 160
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1}
        assert set(s.sentence.split()) <= vocab, s.sentence
        kind = s.meta["kind"]
        kinds.add(kind)
        objs = s.meta["objects"]
        assert 1 <= len(objs) <= 6
        if kind == "none":
            assert s.mask.sum() == 0 and s.box_xyxy is None and s.meta["targets"] == []
        else:
            assert s.mask.sum() > 0 and s.box_xyxy is not None
            x0, y0, x1, y1 = s.box_xyxy
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        if kind == "multi":
            assert len(s.meta["targets"]) >= 2
        elif kind != "none":
            assert len(s.meta["targets"]) == 1
        # every word of the description matches the targets' attributes
        for t in s.meta["targets"]:
            for attr, value in s.meta["desc"].items():
                assert objs[t][attr] == value
    assert kinds == set(KINDS)


def test_novel_domain_words_are_new():
    base_words = set()
    for i in range(200):
        base_words |= set(generate_sample(0, i).sentence.split())
    novel_words = set()
    for i in range(200):
        novel_words |= set(generate_sample(0, i, SyntheticConfig(domain="novel")).sentence.split())
    unseen = novel_words - base_words
    assert {"hexagon", "purple"} <= unseen and "circle" not in novel_words


def test_relations_hold():
    for i in range(300):
        s = generate_sample(1, i)
        if s.meta["kind"] != "rel_pos":
            continue
        t, b = s.meta["objects"][s.meta["targets"][0]], s.meta["objects"][s.meta["anchor"]]
        rel = s.meta["relation"]
        if rel == "left of":
            assert t["cx"] < b["cx"]
        elif rel == "right of":
            assert t["cx"] > b["cx"]
        elif rel == "above":
            assert t["cy"] < b["cy"]
        else:
            assert t["cy"] > b["cy"]


def test_dataset_and_writer(tmp_path):
    ds = SyntheticDataset(5, seed=9)
    lazy = SyntheticDataset(5, seed=9, cache=False)
    assert len(ds) == 5 and ds[4].sentence == lazy[4].sentence == generate_sample(9, 4).sentence
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError):
        SyntheticConfig(domain="mars")
    path = write_synthetic(tmp_path, 3, seed=2, progress=False)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 3 and (tmp_path / recs[0]["image"]).exists() and (tmp_path / recs[0]["mask"]).exists()


def test_synth_cli(tmp_path):
    import argparse

    from ssp_sam.data import synthetic

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    synthetic.register_cli(sub)
    args = parser.parse_args(["synth", str(tmp_path / "out"), "-n", "2", "--domain", "novel"])
    assert args.func(args) == 0
    assert len((tmp_path / "out" / "annotations.jsonl").read_text().splitlines()) == 2
