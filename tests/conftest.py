import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden")


@pytest.fixture(scope="session")
def golden_dir():
    path = os.environ.get("SSP_SAM_GOLDEN_DIR", GOLDEN_DIR)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        pytest.skip(f"no golden folder at {path} (shared/ is present only in development and CI)")
    return path
