"""The house rules between the three roles, checked on the import graph (every import, at module level or inside a
function):

* ``ssp_sam`` (the model library) imports nothing of ``backend``;
* ``backend.labelstudio`` (the protocol both sides speak) imports neither serving nor learning;
* ``backend.learning`` does not import ``backend.serving``;
* nothing the HTTP server can reach imports the training loop (``ssp_sam.train``) or the trainer
  (``backend.learning.finetune``);
* ``backend.prelabel`` (``ssp-sam prelabel``) is a client of the serving side: it uses the server's task -> regions
  code and model resolution, nothing but the command line imports it, and it reaches no training code either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssp_sam", "backend")
TRAINING = {"ssp_sam.train", "backend.learning.finetune"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Repository modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:          # "pkg.mod.func" -> "pkg.mod"
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def _violations(graph, sources: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(sources)
                  for t in targets if t.startswith(forbidden))


def test_the_graph_sees_imports(graph):
    assert "backend.serving.model_manager" in graph["backend.serving.app"]          # module level
    assert "backend.learning.datastore" in graph["backend.serving.app"]             # inside a function
    assert "ssp_sam.build" in graph["ssp_sam.predictor"]                           # relative import


def test_the_model_library_knows_nothing_of_the_backend(graph):
    assert _violations(graph, "ssp_sam", ("backend",)) == []


def test_the_protocol_layer_depends_on_neither_side(graph):
    assert _violations(graph, "backend.labelstudio", ("backend.serving", "backend.learning")) == []


def test_learning_does_not_import_serving(graph):
    assert _violations(graph, "backend.learning", ("backend.serving",)) == []


def test_nothing_the_server_reaches_imports_training(graph):
    for entry in ("backend.serving.wsgi", "backend.serving.app", "backend.__main__"):
        assert TRAINING.isdisjoint(_reachable(graph, entry)), entry


def test_bulk_prelabeling_is_a_client_of_serving(graph):
    assert {"backend.serving.model", "backend.serving.model_manager"} <= graph["backend.prelabel"]
    assert _violations(graph, ("ssp_sam", "backend.serving", "backend.learning", "backend.labelstudio"),
                       ("backend.prelabel",)) == []
    assert [m for m, targets in graph.items() if "backend.prelabel" in targets] == []   # the CLI loads it by name
    assert TRAINING.isdisjoint(_reachable(graph, "backend.prelabel"))


def test_serving_a_prediction_does_not_load_the_training_loop(tmp_path):
    code = ("import sys\n"
            "from backend.serving.app import _default_worker_factory\n"
            "from backend.serving.model_manager import default_predictor_factory\n"
            "import backend.learning.corrections, ssp_sam.predictor\n"
            "bad = sorted(m for m in ('ssp_sam.train', 'backend.learning.finetune') if m in sys.modules)\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
