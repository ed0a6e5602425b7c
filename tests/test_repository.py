"""The repository stands alone: no machine paths and no references to documents outside it, in any committed file
(docs, code, scripts, benchmark results). Tests are left out: some hold such strings on purpose (a fake secret path
that must not leak)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(/work/(main|shared)\b|/tmp/[A-Za-z0-9_.-]|/home/[a-z]|/Users/[A-Za-z]|/root/[a-z.])")
OUTSIDE_DOC = re.compile(r"(ssp-sam-model\.md|label-studio-protocol\.md|landscape\.md|shared/docs|\.\./shared|§)")
BINARY = (".pt", ".gz", ".png", ".npz", ".jpg")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if not p.startswith("tests/") and not p.endswith(BINARY)]


def _offending(pattern: re.Pattern) -> list[str]:
    hits = []
    for path in _tracked():
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    return hits


def test_the_scan_reads_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in _tracked()}
    assert {"README.md", "backend/cli.py", "docs/backend.md"} <= files and not any(f.startswith("tests/") for f in files)
    # the samples are assembled so that this file holds no machine path of its own
    assert MACHINE_PATH.search("see " + "/work" + "/main/x")
    assert MACHINE_PATH.search('"model_dir": "' + "/tmp" + '/learn-x"')
    assert not MACHINE_PATH.search("<tmp>/learn-x") and OUTSIDE_DOC.search("(ssp-sam-model.md §9)")


def test_no_machine_paths():
    assert _offending(MACHINE_PATH) == []


def test_no_references_to_documents_outside_the_repository():
    assert _offending(OUTSIDE_DOC) == []
