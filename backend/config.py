"""Backend configuration: one dataclass, read from the environment.

Names follow label-studio-ml 2.x where it has one (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_*``,
``MODEL_DIR``, ``LOG_LEVEL``, ``PORT``, ``WORKERS``, ``THREADS``); the model's own settings are ``SSP_SAM_*`` and a
few plain names. ``docs/backend.md`` has the table of every variable with its default; keep both in sync
(``tests/test_config.py`` checks that every field is documented).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Union

from backend.labelstudio.prompts import DEFAULT_PROMPT_FIELDS
from backend.labelstudio.protocol import url_origin
from ssp_sam.options import parse_bool



class ConfigError(ValueError):
    """An environment variable has a value the backend cannot use."""


def _get(env: Mapping[str, str], *names: str, default: Optional[str] = None) -> Optional[str]:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return default


def _int(env, name, default: int, minimum: Optional[int] = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env, name, default: float, minimum: Optional[float] = None) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(env, name, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return parse_bool(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a boolean (true/false), got {raw!r}") from None


def _origins(name: str, raw: Optional[str]) -> tuple:
    """A comma-separated list of origins (``http://ls:8080``) -> normalised origins (``protocol.url_origin``)."""
    out = []
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        origin = url_origin(item)
        if origin is None:
            raise ConfigError(f"{name} must list origins like http://ls:8080, got {item.strip()!r}")
        out.append(origin)
    return tuple(out)


def _private_networks(name: str, raw: Optional[str]) -> Union[bool, tuple]:
    """``true``/``false``, or a comma-separated list of networks (CIDR) -> True, False or a tuple of network strings."""
    if raw is None:
        return False
    try:
        return parse_bool(raw)
    except ValueError:
        pass
    nets = []
    for item in raw.split(","):
        if not item.strip():
            continue
        try:
            nets.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{name} must be true, false or a comma-separated list of networks such as "
                              f"10.0.0.0/8, got {item.strip()!r}") from None
    return tuple(nets)


def _weights_dir_variant(weights_dir: str, variant: str, auto_download: bool) -> str:
    """The variant served with ``SSP_SAM_WEIGHTS_DIR``: the folder's own when ``SSP_SAM_VARIANT`` is unset or the
    default ``demo``; an error when it names another one or the folder is no weights folder (unless AUTO_DOWNLOAD is
    to fill it with an official variant's weights)."""
    from ssp_sam.hub import OFFICIAL_WEIGHTS, WeightsError, read_manifest, resolve_variant

    try:
        manifest = read_manifest(weights_dir)
    except WeightsError as exc:
        if auto_download and variant in OFFICIAL_WEIGHTS:
            return variant                               # AUTO_DOWNLOAD downloads into this folder
        hint = (f"; AUTO_DOWNLOAD fills it only for an official SSP_SAM_VARIANT ({', '.join(OFFICIAL_WEIGHTS)})"
                if auto_download else "")
        raise ConfigError(f"SSP_SAM_WEIGHTS_DIR: {exc}{hint}") from None
    try:
        return resolve_variant(variant, manifest)
    except WeightsError as exc:
        raise ConfigError(f"SSP_SAM_WEIGHTS_DIR: {exc}") from None


@dataclass(frozen=True)
class BackendConfig:
    # --- Label Studio connection (label-studio-ml names) ---
    label_studio_url: Optional[str] = None        # LABEL_STUDIO_URL (fallback LABEL_STUDIO_HOST)
    label_studio_api_key: Optional[str] = None    # LABEL_STUDIO_API_KEY (fallback LABEL_STUDIO_ACCESS_TOKEN)
    basic_auth_user: Optional[str] = None         # BASIC_AUTH_USER
    basic_auth_pass: Optional[str] = None         # BASIC_AUTH_PASS
    webhook_secret: Optional[str] = None          # WEBHOOK_SECRET
    local_files_document_root: Optional[str] = None  # LOCAL_FILES_DOCUMENT_ROOT
    label_studio_allowed_hosts: tuple = ()        # LABEL_STUDIO_ALLOWED_HOSTS (origins that may receive the
                                                  # configured token when /setup names them; LABEL_STUDIO_URL unset)
    # --- server ---
    model_dir: str = "./model_dir"                # MODEL_DIR
    log_level: str = "INFO"                       # LOG_LEVEL
    host: str = "127.0.0.1"                       # HOST (ssp-sam serve bind address)
    port: int = 9090                              # PORT
    workers: int = 1                              # WORKERS
    threads: int = 8                              # THREADS (at most THREADS - 1 requests in the app at once)
    timeout: int = 300                            # GUNICORN_TIMEOUT (seconds; a batch predict can be long)
    request_body_timeout_s: float = 15.0          # REQUEST_BODY_TIMEOUT_S (a whole body must arrive within it)
    max_request_body_mb: int = 256                # MAX_REQUEST_BODY_MB (larger bodies get 413)
    # --- model ---
    variant: str = "demo"                         # SSP_SAM_VARIANT
    checkpoint: Optional[str] = None              # SSP_SAM_CHECKPOINT
    sam_checkpoint: Optional[str] = None          # SAM_CHECKPOINT
    clip_checkpoint: Optional[str] = None         # CLIP_CHECKPOINT
    weights_dir: Optional[str] = None             # SSP_SAM_WEIGHTS_DIR (a folder `ssp-sam download-weights` wrote;
                                                  # its files stand in for the three above when they are unset)
    auto_download: bool = False                   # AUTO_DOWNLOAD (official weights missing: fetch them at start
                                                  # into SSP_SAM_WEIGHTS_DIR, else MODEL_DIR/weights/...)
    dataset: str = "refcoco"                      # SSP_SAM_DATASET (of the checkpoint AUTO_DOWNLOAD fetches)
    device: str = "auto"                          # DEVICE
    dtype: str = "auto"                           # DTYPE
    mask_threshold: float = 0.0                   # MASK_THRESHOLD (logit; 0.0 = probability 0.5)
    embedding_cache_mb: int = 512                 # EMBEDDING_CACHE_MB
    predict_batch_size: int = 8                   # PREDICT_BATCH_SIZE (tasks per predict_batch call)
    preload_model: bool = False                   # PRELOAD_MODEL (load in each worker right after it starts)
    sdpa: bool = True                             # SDPA (fused scaled_dot_product_attention in the encoders)
    torch_compile: bool = False                   # TORCH_COMPILE (torch.compile the image encoders at load)
    server_timing: bool = False                   # SERVER_TIMING (Server-Timing header with /predict's stages)
    reload_interval_s: float = 2.0                # RELOAD_INTERVAL_S (how often the version pointer is checked)
    interactive_mask_prompt: bool = False         # INTERACTIVE_MASK_PROMPT (a click refining an interactive session
                                                  # gives SAM the session's last mask as its dense prompt)
    # --- prompts ---
    prompt_fields: tuple = DEFAULT_PROMPT_FIELDS  # PROMPT_FIELDS (comma-separated task data keys)
    # --- media ---
    media_cache_dir: Optional[str] = None         # MEDIA_CACHE_DIR (default MODEL_DIR/media-cache)
    media_cache_mb: int = 1024                    # MEDIA_CACHE_MB
    media_timeout_s: float = 30.0                 # MEDIA_TIMEOUT_S (total per fetch: redirects, fallback, retry)
    max_download_mb: int = 100                    # MAX_DOWNLOAD_MB (bytes after content decoding)
    max_image_pixels: int = 50_000_000            # MAX_IMAGE_PIXELS (checked from the header, before decoding)
    media_allow_private_networks: Union[bool, tuple] = False  # MEDIA_ALLOW_PRIVATE_NETWORKS (true or CIDR list)
    # --- corrections datastore (backend/learning/datastore/) ---
    datastore_url: Optional[str] = None           # DATASTORE_URL (default SQLite MODEL_DIR/corrections.db)
    empty_annotation_is_no_target: bool = True    # EMPTY_ANNOTATION_IS_NO_TARGET (a submitted annotation with a
                                                  # sentence and no brush region = "nothing matches" sample)

    # ------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "BackendConfig":
        env = os.environ if env is None else env
        fields_raw = _get(env, "PROMPT_FIELDS")
        prompt_fields = (tuple(f.strip() for f in fields_raw.split(",") if f.strip())
                         if fields_raw is not None else DEFAULT_PROMPT_FIELDS)
        url = _get(env, "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
        log_level = (_get(env, "LOG_LEVEL", default="INFO") or "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")
        dtype = (_get(env, "DTYPE", default="auto") or "auto").lower()
        weights_dir = _get(env, "SSP_SAM_WEIGHTS_DIR")
        auto_download = _bool(env, "AUTO_DOWNLOAD", False)
        variant = _get(env, "SSP_SAM_VARIANT", default="demo")
        if weights_dir is not None:
            variant = _weights_dir_variant(weights_dir, variant, auto_download)
        dataset = _get(env, "SSP_SAM_DATASET", default="refcoco")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+_.-]*", dataset):
            raise ConfigError(f"SSP_SAM_DATASET must be a dataset name such as refcoco, refcoco+ or refcocog, "
                              f"got {dataset!r}")
        if dtype not in {"auto", "fp32", "bf16", "fp16"}:
            raise ConfigError(f"DTYPE must be auto, fp32, bf16 or fp16, got {dtype!r}")
        values = dict(
            label_studio_url=url.rstrip("/") if url else None,
            label_studio_api_key=_get(env, "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=_get(env, "BASIC_AUTH_USER"),
            basic_auth_pass=_get(env, "BASIC_AUTH_PASS"),
            webhook_secret=_get(env, "WEBHOOK_SECRET"),
            local_files_document_root=_get(env, "LOCAL_FILES_DOCUMENT_ROOT"),
            label_studio_allowed_hosts=_origins("LABEL_STUDIO_ALLOWED_HOSTS", _get(env, "LABEL_STUDIO_ALLOWED_HOSTS")),
            model_dir=_get(env, "MODEL_DIR", default="./model_dir"),
            log_level=log_level,
            host=_get(env, "HOST", default="127.0.0.1"),
            port=_int(env, "PORT", 9090, minimum=0),
            workers=_int(env, "WORKERS", 1, minimum=1),
            threads=_int(env, "THREADS", 8, minimum=1),
            timeout=_int(env, "GUNICORN_TIMEOUT", 300, minimum=0),
            request_body_timeout_s=_float(env, "REQUEST_BODY_TIMEOUT_S", 15.0, minimum=0.1),
            max_request_body_mb=_int(env, "MAX_REQUEST_BODY_MB", 256, minimum=1),
            variant=variant,
            checkpoint=_get(env, "SSP_SAM_CHECKPOINT"),
            sam_checkpoint=_get(env, "SAM_CHECKPOINT"),
            clip_checkpoint=_get(env, "CLIP_CHECKPOINT"),
            weights_dir=weights_dir,
            auto_download=auto_download,
            dataset=dataset,
            device=_get(env, "DEVICE", default="auto"),
            dtype=dtype,
            mask_threshold=_float(env, "MASK_THRESHOLD", 0.0),
            embedding_cache_mb=_int(env, "EMBEDDING_CACHE_MB", 512, minimum=0),
            predict_batch_size=_int(env, "PREDICT_BATCH_SIZE", 8, minimum=1),
            preload_model=_bool(env, "PRELOAD_MODEL", False),
            sdpa=_bool(env, "SDPA", True),
            torch_compile=_bool(env, "TORCH_COMPILE", False),
            server_timing=_bool(env, "SERVER_TIMING", False),
            reload_interval_s=_float(env, "RELOAD_INTERVAL_S", 2.0, minimum=0.0),
            interactive_mask_prompt=_bool(env, "INTERACTIVE_MASK_PROMPT", False),
            prompt_fields=prompt_fields,
            media_cache_dir=_get(env, "MEDIA_CACHE_DIR"),
            media_cache_mb=_int(env, "MEDIA_CACHE_MB", 1024, minimum=1),
            media_timeout_s=_float(env, "MEDIA_TIMEOUT_S", 30.0, minimum=0.1),
            max_download_mb=_int(env, "MAX_DOWNLOAD_MB", 100, minimum=1),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 50_000_000, minimum=1),
            media_allow_private_networks=_private_networks("MEDIA_ALLOW_PRIVATE_NETWORKS",
                                                           _get(env, "MEDIA_ALLOW_PRIVATE_NETWORKS")),
            datastore_url=_get(env, "DATASTORE_URL"),
            empty_annotation_is_no_target=_bool(env, "EMPTY_ANNOTATION_IS_NO_TARGET", True),
        )
        if bool(values["basic_auth_user"]) != bool(values["basic_auth_pass"]):
            raise ConfigError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------
    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def max_request_body_bytes(self) -> int:
        return self.max_request_body_mb * 2**20

    @property
    def max_in_flight(self) -> int:
        """Requests admitted into the app at once: one pool thread stays free for ``/health``."""
        return max(1, self.threads - 1)

    @property
    def resolved_media_cache_dir(self) -> str:
        return self.media_cache_dir or os.path.join(self.model_dir, "media-cache")

    def redacted(self) -> dict:
        """The configuration as a dict with secrets masked (for logs and /health)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"label_studio_api_key", "basic_auth_pass", "webhook_secret"} and value:
                value = "***"
            if f.name == "datastore_url" and value and "@" in value:
                value = value.split("://", 1)[0] + "://***@" + value.rsplit("@", 1)[1]
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
