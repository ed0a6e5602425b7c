"""Hostile task data that is not about the network: symlinks out of the Local Storage root, newlines in URLs."""

from __future__ import annotations

import logging
import os

import pytest
import requests_mock as rmock

from backend.labelstudio.media import MediaError, MediaFetcher
from tests.fakes import LABEL_CONFIG, make_config, png_bytes, task

pytestmark = pytest.mark.reliability


def test_symlink_out_of_the_local_files_root_is_refused(tmp_path, requests_mock, reliability):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "imgs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(5, 5))
    (root / "imgs" / "inside.png").write_bytes(png_bytes(7, 3))
    os.symlink(outside / "secret.png", root / "imgs" / "link.png")
    os.symlink(outside, root / "imgs" / "dirlink")
    os.symlink(root / "imgs" / "inside.png", root / "imgs" / "ok-link.png")
    f = MediaFetcher(make_config(tmp_path, LOCAL_FILES_DOCUMENT_ROOT=str(root)))
    for d in ("imgs/link.png", "imgs/dirlink/secret.png"):
        with pytest.raises(MediaError) as ei:
            f.fetch(f"/data/local-files/?d={d}")
    assert requests_mock.call_count == 0
    assert f.load_image("/data/local-files/?d=imgs/ok-link.png").shape == (3, 7, 3)   # links inside the root work
    reliability("Media inputs", "a symlink in LOCAL_FILES_DOCUMENT_ROOT pointing outside it",
                "/data/local-files/?d=imgs/link.png (-> a file outside the root), and a linked directory",
                f"refused ('{ei.value}'); nothing read, nothing downloaded")


def test_newline_in_an_image_url_cannot_forge_a_log_line(make_app, requests_mock, caplog, reliability):
    caplog.set_level(logging.DEBUG)
    url = "/data/upload/1/a.png\n2030-01-01 00:00:00,000 ERROR [1] backend: FORGED line"
    requests_mock.get(rmock.ANY, status_code=404)
    client = make_app().test_client()
    r = client.post("/predict", json={"tasks": [task(7, url, "the thing")], "project": "1.1",
                                      "label_config": LABEL_CONFIG})
    assert r.status_code == 200
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("FORGED" in m for m in messages)                    # the text is logged...
    assert not [m for m in messages if "\n" in m and "FORGED" in m]   # ...but never on a line of its own
    reliability("Media inputs", "a newline in an image URL",
                "task image '/data/upload/1/a.png\\n2030-01-01 ... ERROR ... FORGED line'",
                "every log record stays one line; the newline is written as \\n")

