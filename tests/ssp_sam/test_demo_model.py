"""The packaged demo model meets its bars on held-out synthetic scenes.

Bars (issue 3): mIoU >= 0.75 and N-acc >= 0.80, measured on 1000 held-out scenes by bench/train_demo.py and
reported in docs/training.md. This test re-checks on 150 scenes of another seed (7; training used seed 0,
validation seed 1, the held-out report seed 2) with margins for the sample size: per-sample IoU has a standard
deviation of about 0.35 on this benchmark, so the mean of 150 has a standard error of about 0.03 and 0.70 is
~1.7 standard errors under 0.75; about a quarter of the scenes (~36) are no-target, so N-acc has a standard error of
about 0.065 near 0.8, and 0.70 is ~1.5 of them under the bar. A model that truly missed the bars by a wide margin
(or a broken load path: wrong tokenizer, wrong frame) fails here.
"""

import time

import pytest
import torch

from ssp_sam.build import DEMO_CHECKPOINT, ModelConfig, load_model
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.train import evaluate_model


def test_demo_bundle_size():
    assert DEMO_CHECKPOINT.exists(), "ssp_sam/assets/ssp_sam_demo.pt is missing (python bench/train_demo.py)"
    assert DEMO_CHECKPOINT.stat().st_size <= 25 * 2**20


def test_demo_model_meets_bars():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        loaded = load_model(ModelConfig(variant="demo", device="cpu"))
        data = SyntheticDataset(150, seed=7)
        m = evaluate_model(loaded.model, loaded.tokenizer, data, batch_size=32, original_resolution=False)
    finally:
        torch.set_num_threads(n_threads)
    assert m["n"] == 150 and m["n_empty"] >= 20
    assert m["mIoU"] >= 0.70, m
    assert m["N-acc"] >= 0.70, m
    assert time.time() - t0 < 120
    _ = pytest
