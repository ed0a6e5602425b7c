import os

import pytest
import torch

from backend.serving.app import create_app
from tests.fakes import LS_URL, FakePredictor, FakeStore, make_config
from tests.ssp_sam.weights_files import WeightsHomes, tiny_weight_files

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden")


@pytest.fixture(scope="session")
def golden_dir():
    path = os.environ.get("SSP_SAM_GOLDEN_DIR", GOLDEN_DIR)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        message = f"no golden folder at {path} (set SSP_SAM_GOLDEN_DIR; the reference outputs are not in this repository)"
        if os.environ.get("CI"):
            pytest.fail(message)       # CI has them: the parity check never silently switches itself off there
        pytest.skip(message)
    return path


# ---------------------------------------------------------------------- backend fixtures
@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def predictor():
    return FakePredictor()


@pytest.fixture
def make_app(tmp_path, store, predictor):
    def _make(predictor_factory=None, store_factory=None, **env):
        cfg = make_config(tmp_path, **env)
        factory = predictor_factory or (lambda config, ckpt: predictor)
        app = create_app(cfg, predictor_factory=factory, store_factory=store_factory or (lambda c: store),
                         start_worker=False)
        app.testing = True
        return app
    return _make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def ls_media(requests_mock):
    """Serve /data/upload/1/<name> through LS's /storage-data proxy (token required)."""
    files = {}

    def add(name, content, project=1):
        url = f"{LS_URL}/storage-data/uploaded/?filepath=upload/{project}/{name}"
        requests_mock.get(url, content=content)
        files[name] = url
        return f"/data/upload/{project}/{name}"

    return add


# ---------------------------------------------------------------------- reliability record
# docs/reliability.md is generated from the test run: tests of hostile input, slow clients and faults record each case
# (what was sent, what came back) through this fixture; `scripts/reliability_report.py` runs them and renders the page.
RELIABILITY_LOG = os.environ.get("RELIABILITY_LOG")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> str:
    """A bundle (``ssp_sam.checkpoints.save_bundle``) of the untrained ``tiny`` variant, seed 0: a base model for
    fine-tuning and hot-reload tests. Treat it as read-only."""
    from ssp_sam.build import build_model
    from ssp_sam.checkpoints import save_bundle
    from ssp_sam.tokenizer import load_tokenizer

    model = build_model("tiny", seed=0)
    path = tmp_path_factory.mktemp("tiny-bundle") / "tiny.pt"
    save_bundle(model, load_tokenizer(model.spec), path, meta={"version": "tiny-base"})
    return str(path)


@pytest.fixture
def reliability(request):
    """``reliability(area, case, sent, got)``: record one case for docs/reliability.md (a no-op unless the
    RELIABILITY_LOG environment variable names the JSON-lines file to append to)."""
    import json

    def record(area: str, case: str, sent: str, got: str) -> None:
        if RELIABILITY_LOG:
            with open(RELIABILITY_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps({"area": area, "case": case, "sent": sent, "got": got,
                                    "test": request.node.nodeid}) + "\n")
    return record


@pytest.fixture(scope="module")
def tiny_files():
    """Tiny weight files in the official formats (tests/ssp_sam/weights_files.py), made once per module."""
    return tiny_weight_files(seed=0)


@pytest.fixture
def homes(tmp_path, monkeypatch, tiny_files):
    """A local server playing Hugging Face, the SAM URL and the CLIP URL, with the environment pointed at it."""
    h = WeightsHomes(tmp_path, monkeypatch, tiny_files)
    yield h
    h.stop()
