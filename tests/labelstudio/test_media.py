"""Media access through label-studio-sdk: tokens, host matching, fallbacks, local files, cache bound."""

from __future__ import annotations

import base64
import os
import time

import jwt
import numpy as np
import pytest

from backend.labelstudio.media import MediaError, MediaFetcher, jwt_token_type
from tests.fakes import LEGACY_TOKEN, LS_URL, make_config, png_bytes


def fetcher(tmp_path, token_client_factory=None, **env):
    cfg = make_config(tmp_path, **env)
    return MediaFetcher(cfg, token_client_factory=token_client_factory,
                        persist_path=os.path.join(cfg.model_dir, "ls_connection.json"))


def make_jwt(token_type, exp_in=3600):
    claims = {"token_type": token_type, "exp": int(time.time()) + exp_in, "user_id": 1}
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def test_upload_via_storage_proxy_with_legacy_token(tmp_path, requests_mock):
    url = f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/a.png"
    requests_mock.get(url, content=png_bytes(20, 10))
    f = fetcher(tmp_path)
    img = f.load_image("/data/upload/1/a.png", task_id=5)
    assert img.shape == (10, 20, 3) and img.dtype == np.uint8
    assert requests_mock.call_count == 1
    assert requests_mock.request_history[0].headers["Authorization"] == f"Token {LEGACY_TOKEN}"
    # second fetch: served from the cache, no request
    f.load_image("/data/upload/1/a.png", task_id=5)
    assert requests_mock.call_count == 1
    assert f.stats()["hits"] == 1 and f.stats()["misses"] == 1


def test_storage_data_fallback_to_legacy_upload_path(tmp_path, requests_mock):
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/2/b.png", status_code=404)
    requests_mock.get(f"{LS_URL}/data/upload/2/b.png", content=png_bytes(8, 6))
    f = fetcher(tmp_path)
    assert f.load_image("/data/upload/2/b.png").shape == (6, 8, 3)
    hist = requests_mock.request_history
    assert [h.path for h in hist] == ["/storage-data/uploaded/", "/data/upload/2/b.png"]
    assert all(h.headers["Authorization"] == f"Token {LEGACY_TOKEN}" for h in hist)


def test_token_only_sent_to_label_studio_host(tmp_path, requests_mock):
    requests_mock.get("https://images.example.com/c.png", content=png_bytes())
    requests_mock.get(f"{LS_URL}/data/local-files/?d=imgs/c.png", content=png_bytes())
    f = fetcher(tmp_path)
    f.load_image("https://images.example.com/c.png")
    f.load_image(f"{LS_URL}/data/local-files/?d=imgs/c.png")
    foreign, ls = requests_mock.request_history
    assert "Authorization" not in foreign.headers
    assert ls.headers["Authorization"] == f"Token {LEGACY_TOKEN}"


def test_relative_local_files_url_downloads_from_ls(tmp_path, requests_mock):
    requests_mock.get(f"{LS_URL}/data/local-files/?d=imgs/d.png", content=png_bytes(5, 4))
    f = fetcher(tmp_path)
    assert f.load_image("/data/local-files/?d=imgs/d.png").shape == (4, 5, 3)
    assert requests_mock.request_history[0].headers["Authorization"] == f"Token {LEGACY_TOKEN}"


def test_local_files_read_from_document_root(tmp_path, requests_mock):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "e.png").write_bytes(png_bytes(7, 3))
    f = fetcher(tmp_path, LOCAL_FILES_DOCUMENT_ROOT=str(root))
    assert f.load_image("/data/local-files/?d=imgs/e.png").shape == (3, 7, 3)
    assert requests_mock.call_count == 0
    with pytest.raises(MediaError):          # no escaping the root
        f.fetch("/data/local-files/?d=../../etc/passwd")


def test_cloud_uri_uses_presign_endpoint(tmp_path, requests_mock):
    uri = "s3://bucket/x/f.png"
    enc = base64.urlsafe_b64encode(uri.encode()).decode()
    requests_mock.get(f"{LS_URL}/tasks/9/presign/?fileuri={enc}", content=png_bytes(4, 4))
    f = fetcher(tmp_path)
    assert f.load_image(uri, task_id=9).shape == (4, 4, 3)
    assert requests_mock.request_history[0].headers["Authorization"] == f"Token {LEGACY_TOKEN}"


def test_personal_access_token_is_exchanged_for_bearer(tmp_path, requests_mock):
    pat = make_jwt("refresh")
    access = make_jwt("access", 300)
    made = []

    class FakeTokens:
        def __init__(self, host, token):
            made.append((host, token))

        def access_token(self):
            return access
    assert jwt_token_type(pat) == "refresh" and jwt_token_type(LEGACY_TOKEN) is None
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/b.png", content=png_bytes())
    f = fetcher(tmp_path, token_client_factory=FakeTokens, LABEL_STUDIO_API_KEY=pat)
    f.fetch("/data/upload/1/a.png")
    f.fetch("/data/upload/1/b.png")
    assert made == [(LS_URL, pat)]                         # one token client, reused
    for h in requests_mock.request_history:
        assert h.headers["Authorization"] == f"Bearer {access}"


def test_pat_refresh_failure_is_a_clear_error(tmp_path):
    class Failing:
        def __init__(self, host, token):
            pass

        def access_token(self):
            raise RuntimeError("401")
    f = fetcher(tmp_path, token_client_factory=Failing, LABEL_STUDIO_API_KEY=make_jwt("refresh"))
    with pytest.raises(MediaError, match="personal access token"):
        f.fetch("/data/upload/1/a.png")


def test_setup_connection_used_when_env_has_none(tmp_path, requests_mock):
    requests_mock.get("http://ls.other:8080/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None, LABEL_STUDIO_API_KEY=None)
    with pytest.raises(MediaError, match="no Label Studio host"):
        f.fetch("/data/upload/1/a.png")
    f.set_connection("http://ls.other:8080", "setup-token-1", project_id="1")
    f.fetch("/data/upload/1/a.png", project_id="1")
    assert requests_mock.request_history[-1].headers["Authorization"] == "Token setup-token-1"
    # another worker process (a new fetcher on the same MODEL_DIR) sees the /setup connection
    persisted = os.path.join(f.config.model_dir, "ls_connection.json")
    assert oct(os.stat(persisted).st_mode & 0o777) == "0o600"
    g = fetcher(tmp_path, LABEL_STUDIO_URL=None, LABEL_STUDIO_API_KEY=None)
    assert g.connection("1") == ("http://ls.other:8080", "setup-token-1")


def test_env_connection_wins_over_setup(tmp_path):
    f = fetcher(tmp_path)
    f.set_connection("http://elsewhere:1", "tok-from-setup")
    assert f.connection() == (LS_URL, LEGACY_TOKEN)


def test_http_errors_are_clear_and_never_leak_the_token(tmp_path, requests_mock):
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/z.png", status_code=401)
    requests_mock.get(f"{LS_URL}/data/upload/1/z.png", status_code=401)
    f = fetcher(tmp_path)
    with pytest.raises(MediaError) as ei:
        f.fetch("/data/upload/1/z.png")
    assert "401" in str(ei.value) and "LABEL_STUDIO_API_KEY" in str(ei.value)
    assert LEGACY_TOKEN not in str(ei.value)
    assert f.stats()["errors"] == 1


def test_presigned_query_not_in_error_messages(tmp_path, requests_mock):
    requests_mock.get("https://bucket.s3.amazonaws.com/f.png?X-Amz-Signature=SECRET", status_code=403)
    f = fetcher(tmp_path)
    with pytest.raises(MediaError) as ei:
        f.fetch("https://bucket.s3.amazonaws.com/f.png?X-Amz-Signature=SECRET")
    assert "SECRET" not in str(ei.value)


def test_download_cache_is_bounded(tmp_path, requests_mock):
    big = os.urandom(400 * 1024)
    for i in range(6):
        requests_mock.get(f"https://cdn.example.com/{i}.bin", content=big)
    f = fetcher(tmp_path, MEDIA_CACHE_MB="1")
    paths = [f.fetch(f"https://cdn.example.com/{i}.bin") for i in range(6)]
    st = f.stats()
    assert st["cache_bytes"] <= 1024 * 1024
    assert st["evicted_files"] >= 3
    assert os.path.exists(paths[-1])


def test_missing_url(tmp_path):
    with pytest.raises(MediaError, match="no media URL"):
        fetcher(tmp_path).fetch("")


def test_truncated_cache_file_is_downloaded_again(tmp_path, requests_mock):
    url = f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/t.png"
    requests_mock.get(url, content=png_bytes(9, 7))
    f = fetcher(tmp_path)
    path = f.fetch("/data/upload/1/t.png")
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n")                  # a partial write by another process
    assert f.load_image("/data/upload/1/t.png").shape == (7, 9, 3)
    assert requests_mock.call_count == 2


def test_undecodable_image_is_a_media_error(tmp_path, requests_mock):
    requests_mock.get("https://cdn.example.com/x.png", content=b"not an image")
    with pytest.raises(MediaError, match="cannot decode"):
        fetcher(tmp_path).load_image("https://cdn.example.com/x.png")


def test_expired_pat_is_a_clear_error(tmp_path):
    """The real SDK token client refuses an expired PAT when it is built; that is a MediaError, not a crash."""
    f = fetcher(tmp_path, LABEL_STUDIO_API_KEY=make_jwt("refresh", exp_in=-60))
    with pytest.raises(MediaError, match="personal access token"):
        f.fetch("/data/upload/1/a.png")
