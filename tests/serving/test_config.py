from __future__ import annotations

import os
import re

import pytest

from backend.config import BackendConfig, ConfigError

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "backend.md")
ENV_NAMES = ["LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "MODEL_DIR", "LOG_LEVEL",
             "PORT", "WORKERS", "THREADS", "SSP_SAM_VARIANT", "SSP_SAM_CHECKPOINT", "SAM_CHECKPOINT", "CLIP_CHECKPOINT",
             "DEVICE", "DTYPE", "MASK_THRESHOLD", "EMBEDDING_CACHE_MB", "PROMPT_FIELDS", "WEBHOOK_SECRET",
             "LOCAL_FILES_DOCUMENT_ROOT", "HOST", "GUNICORN_TIMEOUT", "PREDICT_BATCH_SIZE", "PRELOAD_MODEL",
             "RELOAD_INTERVAL_S", "MEDIA_CACHE_DIR", "MEDIA_CACHE_MB", "MEDIA_TIMEOUT_S", "DATASTORE_URL",
             "LABEL_STUDIO_ALLOWED_HOSTS", "MAX_DOWNLOAD_MB", "MAX_IMAGE_PIXELS", "MEDIA_ALLOW_PRIVATE_NETWORKS",
             "REQUEST_BODY_TIMEOUT_S", "MAX_REQUEST_BODY_MB", "SSP_SAM_WEIGHTS_DIR", "AUTO_DOWNLOAD", "SSP_SAM_DATASET",
             "SDPA", "TORCH_COMPILE", "SERVER_TIMING"]


def test_defaults():
    c = BackendConfig.from_env({})
    assert c.variant == "demo" and c.device == "auto" and c.dtype == "auto"
    assert c.prompt_fields == ("text", "prompt", "caption", "expression")
    assert (c.port, c.workers, c.threads, c.mask_threshold, c.embedding_cache_mb) == (9090, 1, 8, 0.0, 512)
    assert (c.request_body_timeout_s, c.max_request_body_mb, c.max_request_body_bytes) == (15.0, 256, 256 * 2**20)
    assert c.max_in_flight == 7                                  # THREADS - 1: one thread stays free for /health
    assert BackendConfig.from_env({"THREADS": "1"}).max_in_flight == 1
    assert c.label_studio_url is None and not c.basic_auth_enabled
    assert (c.weights_dir, c.auto_download, c.dataset) == (None, False, "refcoco")


def test_parsing_and_fallbacks():
    c = BackendConfig.from_env({"LABEL_STUDIO_HOST": "http://ls:8080/", "LABEL_STUDIO_ACCESS_TOKEN": "t0k3n",
                                "PROMPT_FIELDS": " sentence , ref ", "WORKERS": "2", "MASK_THRESHOLD": "-0.5",
                                "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "PRELOAD_MODEL": "yes",
                                "LOG_LEVEL": "debug", "DTYPE": "BF16"})
    assert c.label_studio_url == "http://ls:8080" and c.label_studio_api_key == "t0k3n"
    assert c.prompt_fields == ("sentence", "ref") and c.workers == 2 and c.mask_threshold == -0.5
    assert c.basic_auth_enabled and c.preload_model and c.log_level == "DEBUG" and c.dtype == "bf16"
    red = c.redacted()
    assert red["label_studio_api_key"] == "***" and red["basic_auth_pass"] == "***"


@pytest.mark.parametrize("env,fragment", [
    ({"PORT": "x"}, "PORT"), ({"WORKERS": "0"}, "WORKERS"), ({"LABEL_STUDIO_URL": "ls:8080"}, "http"),
    ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"), ({"PRELOAD_MODEL": "maybe"}, "PRELOAD_MODEL"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"), ({"DTYPE": "int8"}, "DTYPE"), ({"MASK_THRESHOLD": "high"}, "MASK"),
    ({"MAX_IMAGE_PIXELS": "0"}, "MAX_IMAGE_PIXELS"), ({"MAX_DOWNLOAD_MB": "x"}, "MAX_DOWNLOAD_MB"),
    ({"MEDIA_ALLOW_PRIVATE_NETWORKS": "10.0.0.0/33"}, "MEDIA_ALLOW_PRIVATE_NETWORKS"),
    ({"LABEL_STUDIO_ALLOWED_HOSTS": "ls:8080"}, "LABEL_STUDIO_ALLOWED_HOSTS"),
    ({"REQUEST_BODY_TIMEOUT_S": "0"}, "REQUEST_BODY_TIMEOUT_S"), ({"REQUEST_BODY_TIMEOUT_S": "soon"}, "REQUEST_BODY"),
    ({"MAX_REQUEST_BODY_MB": "0"}, "MAX_REQUEST_BODY_MB"), ({"MAX_REQUEST_BODY_MB": "1.5"}, "MAX_REQUEST_BODY_MB"),
    ({"AUTO_DOWNLOAD": "sometimes"}, "AUTO_DOWNLOAD"), ({"SSP_SAM_DATASET": "../x"}, "SSP_SAM_DATASET"),
    ({"SSP_SAM_WEIGHTS_DIR": "/nonexistent/weights"}, "SSP_SAM_WEIGHTS_DIR: weights folder .* does not exist"),
])
def test_bad_values(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BackendConfig.from_env(env)


def test_media_settings():
    c = BackendConfig.from_env({})
    assert (c.max_download_mb, c.max_image_pixels, c.media_allow_private_networks) == (100, 50_000_000, False)
    assert c.label_studio_allowed_hosts == ()
    c = BackendConfig.from_env({"LABEL_STUDIO_ALLOWED_HOSTS": "http://LS:8080/, https://ls.example.com",
                                "MEDIA_ALLOW_PRIVATE_NETWORKS": "10.0.0.0/8, 127.0.0.1"})
    assert c.label_studio_allowed_hosts == ("http://ls:8080", "https://ls.example.com:443")
    assert c.media_allow_private_networks == ("10.0.0.0/8", "127.0.0.1/32")
    assert BackendConfig.from_env({"MEDIA_ALLOW_PRIVATE_NETWORKS": "yes"}).media_allow_private_networks is True


def test_every_variable_is_documented():
    text = open(DOC, encoding="utf-8").read()
    rows = set(re.findall(r"^\|\s*`([A-Z_]+)`", text, flags=re.M))
    missing = [n for n in ENV_NAMES if n not in rows]
    assert not missing, f"not in the docs/backend.md table: {missing}"
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "backend", "config.py")).read()
    read = set(re.findall(r'_(?:get|int|float|bool)\(env, "([A-Z_]+)"(?:, "([A-Z_]+)")?', src))
    read = {name for pair in read for name in pair if name}
    assert "LABEL_STUDIO_URL" in read and "DATASTORE_URL" in read
    assert not (read - rows - {"LABEL_STUDIO_HOST", "LABEL_STUDIO_ACCESS_TOKEN"}), read - rows
