"""The packaged demo model on held-out synthetic scenes (150 scenes of seed 7; training used seed 0, validation
seed 1, the held-out report of docs/training.md seed 2).

Issue 3 asks for mIoU >= 0.75 and N-acc >= 0.80. Measured on 1000 held-out scenes the committed bundle reaches
N-acc 0.892 but mIoU 0.615 (docs/training.md). ``test_demo_meets_no_target_bar`` asserts the first with a margin for
150 scenes (~48 are no-target, so N-acc has a standard error of about 0.05 near 0.85-0.9 and 0.75 is ~2.5 of them
under the measured 0.917); ``test_demo_meets_miou_bar`` is a strict xfail: it documents the gap and turns into a
failure (XPASS) the day a bundle that meets the bar is committed, so the marker gets removed (per-sample IoU has a
standard deviation of about 0.4 here, so the mean of 150 has a standard error of about 0.033 and 0.70 is ~1.5 of
them under 0.75).

``test_demo_regression`` guards what the bundle does achieve, with bars a trivial predictor cannot pass (an all-empty
prediction scores 0 on target scenes; "segment every shape" scores ~0.3 on single-target scenes and 0 on no-target
ones): it fails on a broken load path (tokenizer, frames, weights) or a worse bundle.
"""

import time

import pytest
import torch

from ssp_sam.build import DEMO_CHECKPOINT, ModelConfig, load_model
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.train import evaluate_model


@pytest.fixture(scope="module")
def metrics():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.time()
        loaded = load_model(ModelConfig(variant="demo", device="cpu"))
        m = evaluate_model(loaded.model, loaded.tokenizer, SyntheticDataset(150, seed=7), batch_size=32,
                           original_resolution=False)
        m["_seconds"] = time.time() - t0
    finally:
        torch.set_num_threads(n_threads)
    return m


def test_demo_bundle_size():
    assert DEMO_CHECKPOINT.exists(), "ssp_sam/assets/ssp_sam_demo.pt is missing (python bench/train_demo.py)"
    assert DEMO_CHECKPOINT.stat().st_size <= 25 * 2**20


def test_demo_regression(metrics):
    m = metrics
    assert m["n"] == 150 and m["n_empty"] >= 20
    target_miou = (m["mIoU"] * m["n"] - m["N-acc"] * m["n_empty"]) / (m["n"] - m["n_empty"])
    assert target_miou >= 0.42, m        # measured 0.490
    assert m["multi/mIoU"] >= 0.55, m    # measured 0.635
    assert m["attr/mIoU"] >= 0.42, m     # measured 0.475
    assert m["_seconds"] < 60


def test_demo_meets_no_target_bar(metrics):
    assert metrics["N-acc"] >= 0.75, metrics  # issue bar 0.80; measured 0.917 here, 0.892 on 1000 scenes


@pytest.mark.xfail(strict=True, reason="the committed demo bundle misses the issue-3 mIoU bar (docs/training.md)")
def test_demo_meets_miou_bar(metrics):
    assert metrics["mIoU"] >= 0.70, metrics  # issue bar 0.75; measured 0.626 here, 0.615 on 1000 scenes
