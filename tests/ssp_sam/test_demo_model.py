"""The packaged demo model on the 1000 held-out synthetic scenes docs/training.md reports (``synthetic:1000:seed=2``;
training used seed 0, validation seed 1).

The bar is what the demo's 24-minute CPU budget gives: mIoU >= 0.60 and N-acc >= 0.80; the shipped bundle
measured 0.615 / 0.892 (frame 64^2). The per-kind checks guard what a trivial predictor cannot reach (an all-empty
prediction scores 0 on target scenes; "segment every shape" scores ~0.3 on single-target scenes and 0 on no-target
ones), so a broken load path (tokenizer, frames, weights) or a worse bundle fails them.
"""

import pytest
import torch

from ssp_sam.build import DEMO_CHECKPOINT, ModelConfig, load_model
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.evaluate import evaluate_model


@pytest.fixture(scope="module")
def metrics():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(ModelConfig(variant="demo", device="cpu"))
        return evaluate_model(loaded.model, loaded.tokenizer, SyntheticDataset(1000, seed=2), batch_size=32,
                              original_resolution=False)
    finally:
        torch.set_num_threads(n_threads)


def test_demo_bundle_size():
    assert DEMO_CHECKPOINT.exists(), "ssp_sam/assets/ssp_sam_demo.pt is missing (python bench/train_demo.py)"
    assert DEMO_CHECKPOINT.stat().st_size <= 25 * 2**20


def test_demo_meets_the_bar(metrics):
    assert metrics["n"] == 1000
    assert metrics["mIoU"] >= 0.60, metrics   # measured 0.615
    assert metrics["N-acc"] >= 0.80, metrics  # measured 0.892


def test_demo_regression_per_kind(metrics):
    m = metrics
    assert m["n_empty"] >= 200                                                  # 249 no-target scenes
    target_miou = (m["mIoU"] * m["n"] - m["N-acc"] * m["n_empty"]) / (m["n"] - m["n_empty"])
    assert target_miou >= 0.45, m          # measured 0.523
    assert m["multi/mIoU"] >= 0.55, m      # measured 0.649
    assert m["attr/mIoU"] >= 0.45, m       # measured 0.533
    assert m["abs_pos/mIoU"] >= 0.35, m    # measured 0.464
    assert m["rel_pos/mIoU"] >= 0.35, m    # measured 0.514
