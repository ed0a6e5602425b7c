"""The one adapter over label-studio-sdk's media access.

Everything that downloads task media goes through :class:`MediaFetcher`; the private SDK path
``label_studio_sdk._extensions.label_studio_tools.core.utils.io`` is imported here and nowhere else.

What it handles (the SDK does the URL logic; this module adds what the SDK lacks):
- uploads (``/data/upload/<pid>/<file>``: ``/storage-data/uploaded/?filepath=...`` first, then the legacy path),
  Local Storage (``/data/local-files/?d=...``, relative or absolute; read from disk when
  ``LOCAL_FILES_DOCUMENT_ROOT`` is set), cloud URIs (``s3://``, ``gs://``, ``azure-blob://`` through LS's presign
  endpoint, needs the task id) and plain ``http(s)://`` URLs;
- legacy tokens (``Authorization: Token``) and personal access tokens (a JWT refresh token exchanged for a
  short-lived access token through the SDK's token client, sent as ``Bearer``);
- the token goes only to the Label Studio host (the SDK attaches it only when the URL's host equals the LS host, and
  a redirect to another origin drops it), and the configured token only to a host the operator named
  (:meth:`MediaFetcher.connection`);
- host and token from the environment first, then from LS's ``/setup`` call (``hostname``/``access_token``);
- every download through :class:`backend.labelstudio.download.GuardedSession` (installed with the SDK's
  ``http_session`` hook): public addresses only unless allowed, the LS host excepted; ``MAX_DOWNLOAD_MB`` on the
  decoded stream; ``MEDIA_TIMEOUT_S`` as the total time of one fetch; images bounded by ``MAX_IMAGE_PIXELS`` from
  their header, before decoding;
- Local Storage files only when their real path (symlinks resolved) is under ``LOCAL_FILES_DOCUMENT_ROOT``;
- client-facing errors coarse for hosts other than LS ("cannot download the image of task 7": a closed port and an
  HTTP 404 look the same), the precise reason in the log; URLs in messages and logs on one line;
- a download cache bounded in bytes (oldest files evicted), unlike the SDK's unbounded one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import replace
from typing import Callable, Optional
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image

from label_studio_sdk._extensions.label_studio_tools.core.utils import io as _ls_io

from backend.labelstudio.download import (AddressPolicy, Deadline, DownloadError, DownloadLimitExceeded,
                                          GuardedSession)
from backend.labelstudio.protocol import url_origin
from backend.logs import OneLineMessages, loggable
from ssp_sam.images import ImageRef, ImageTooLarge, file_digest, load_image
from ssp_sam.timing import stage
from ssp_sam.io import write_text_atomic

logger = logging.getLogger(__name__)
_ls_io.logger.addFilter(OneLineMessages())    # the SDK logs resolved URLs as they are, newlines included

# Pillow's own decompression-bomb guard stays as the last line; a task's images are bounded by MAX_IMAGE_PIXELS (from
# the header, before decoding) long before it.
Image.MAX_IMAGE_PIXELS = 400_000_000


class MediaError(Exception):
    """A task's media could not be read. The message is safe to show to a client (no secrets)."""


def _jwt_claims(token: str) -> dict:
    """The claims of a JWT, unverified ({} for a legacy key): Label Studio checks the signature, this only reads
    which kind of token it is and when it expires."""
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except Exception:
        return {}


def jwt_token_type(token: str) -> Optional[str]:
    """``"refresh"`` for a personal access token, ``"access"`` for an access JWT, None for a legacy key."""
    return _jwt_claims(token).get("token_type")


class _SDKTokenClient:
    """Exchanges a personal access token (a JWT refresh token) for short-lived access tokens through the SDK's public
    ``client.tokens.refresh``; the access token is reused until a minute before it expires (thread-safe)."""

    def __init__(self, hostname: str, pat: str):
        from label_studio_sdk.client import LabelStudio

        self._client = LabelStudio(base_url=hostname, api_key=pat)
        self._pat = pat
        self._lock = threading.Lock()
        self._access: Optional[str] = None
        self._expires = 0.0

    def access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() > self._expires - 60:
                self._access = self._client.tokens.refresh(refresh=self._pat).access
                self._expires = float(_jwt_claims(self._access).get("exp") or 0)
            return self._access


TokenClientFactory = Callable[[str, str], object]   # (hostname, pat) -> object with .access_token()


class MediaFetcher:
    """Downloads (and caches) task media; loads images as EXIF-transposed RGB arrays.

    Interface used by the app and by ``backend.learning.corrections.CorrectionWorker``:
      ``fetch(url, task_id=None, project_id=None) -> str``           local path of the file
      ``load_image(url, task_id=None, project_id=None) -> np.ndarray``  (H, W, 3) uint8, EXIF-transposed
      ``open_image(url, task_id=None, project_id=None) -> ImageRef``    content key and size; decoded on demand
      ``set_connection(hostname, access_token, project_id=None)``    host/token from LS's /setup
      ``stats() -> dict``                                            hits, misses, errors, cache bytes
    """

    def __init__(self, config, token_client_factory: Optional[TokenClientFactory] = None,
                 persist_path: Optional[str] = None):
        self.config = config
        # /setup reaches one gunicorn worker only: the connection is shared with the others through this file (0600)
        self.persist_path = persist_path
        self._persist_sig = None
        self.cache_dir = config.resolved_media_cache_dir
        self.max_bytes = int(config.media_cache_mb) * 2**20
        # A directory that never exists: the SDK then never reads uploads from a co-located LS data dir by guessing
        # paths (user_data_dir); uploads are always downloaded with the token, like on a remote machine.
        self._no_local_uploads = os.path.join(self.cache_dir, ".no-local-uploads")
        self._token_client_factory = token_client_factory or _SDKTokenClient
        self._token_clients: dict = {}
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        # striped locks: two threads never download the same URL into the same cache file at once
        self._url_locks = [threading.Lock() for _ in range(64)]
        self._addresses = AddressPolicy(allow_private=config.media_allow_private_networks)
        self.max_download_bytes = int(config.max_download_mb) * 2**20
        self._known: dict = {}               # cached path -> (size, mtime_ns) when last served
        self._identities: dict = {}          # path -> (content key, (h, w)) while the file is unchanged
        self._setup_conn: dict = {}          # project_id -> (hostname, token); None key = last /setup
        self._counters = {"hits": 0, "misses": 0, "errors": 0, "evicted_files": 0}
        os.makedirs(self.cache_dir, exist_ok=True)

    # ------------------------------------------------------------------ connection
    def set_connection(self, hostname: Optional[str], access_token: Optional[str], project_id=None) -> None:
        """Remember what LS sent in /setup; used only where the environment gives no host/token."""
        if hostname and not str(hostname).startswith(("http://", "https://")):
            logger.warning("ignoring /setup hostname without http(s) scheme: %r", hostname)
            hostname = None
        if not hostname and not access_token:
            return
        conn = ((hostname or "").rstrip("/") or None, access_token or None)
        with self._lock:
            if self._setup_conn.get(None) == conn and (project_id is None
                                                       or self._setup_conn.get(str(project_id)) == conn):
                return
            self._setup_conn[None] = conn
            if project_id is not None:
                self._setup_conn[str(project_id)] = conn
            snapshot = {("" if k is None else k): list(v) for k, v in self._setup_conn.items()}
        self._persist(snapshot)

    def _persist(self, snapshot: dict) -> None:
        if not self.persist_path:
            return
        try:
            write_text_atomic(self.persist_path, json.dumps(snapshot), permissions=0o600)
        except OSError as exc:
            logger.warning("cannot persist the Label Studio connection: %s", exc)

    def _reload_persisted(self) -> None:
        """Pick up a connection another worker process received in /setup."""
        if not self.persist_path:
            return
        try:
            st = os.stat(self.persist_path)
        except OSError:
            return
        sig = (st.st_mtime_ns, st.st_size)
        if sig == self._persist_sig:
            return
        try:
            with open(self.persist_path, "r", encoding="utf-8") as f:
                data = json.load(f)
            conns = {(None if k == "" else k): (v[0], v[1]) for k, v in data.items()}
        except (OSError, ValueError, TypeError, IndexError) as exc:
            logger.warning("ignoring unreadable %s: %s", self.persist_path, exc)
            return
        with self._lock:
            self._persist_sig = sig
            for k, v in conns.items():
                self._setup_conn[k] = v

    def connection(self, project_id=None) -> tuple[Optional[str], Optional[str]]:
        """(hostname, token) to use. /setup is unauthenticated, so the configured token never follows a host it names:

        - ``LABEL_STUDIO_URL`` set: that host (a /setup hostname never changes it), ``LABEL_STUDIO_API_KEY`` or else
          the /setup token;
        - only ``LABEL_STUDIO_API_KEY`` set: the /setup host; the configured token only when that host's origin is in
          ``LABEL_STUDIO_ALLOWED_HOSTS``, otherwise the token the same /setup sent (Label Studio's own), if any;
        - neither: host and token from /setup (they come together).

        /setup for this project first, then the last /setup."""
        cfg = self.config
        if not (cfg.label_studio_url and cfg.label_studio_api_key):
            self._reload_persisted()
        with self._lock:
            setup = self._setup_conn.get(str(project_id)) if project_id is not None else None
            setup_host, setup_token = setup or self._setup_conn.get(None) or (None, None)
        if cfg.label_studio_url:
            return cfg.label_studio_url, cfg.label_studio_api_key or setup_token
        if cfg.label_studio_api_key and (setup_host is None
                                         or url_origin(setup_host) in cfg.label_studio_allowed_hosts):
            return setup_host, cfg.label_studio_api_key
        return setup_host, setup_token

    def trusted_origins(self, hostname: Optional[str]) -> frozenset:
        """Origins downloads may reach whatever their address: the Label Studio host (``LABEL_STUDIO_URL``, the
        ``LABEL_STUDIO_ALLOWED_HOSTS``, or the /setup host when neither a URL nor a token is configured)."""
        cfg = self.config
        origins = set(cfg.label_studio_allowed_hosts)
        if cfg.label_studio_url:
            origins.add(url_origin(cfg.label_studio_url))
        elif hostname and not cfg.label_studio_api_key:
            origins.add(url_origin(hostname))
        return frozenset(o for o in origins if o)

    def _auth_token(self, hostname: Optional[str], token: Optional[str]) -> Optional[str]:
        """The token to put on the wire: legacy keys unchanged, PATs exchanged for an access token."""
        if not token or not hostname:
            return token
        if jwt_token_type(token) != "refresh":
            return token
        key = (hostname, token)
        try:
            with self._lock:
                client = self._token_clients.get(key)
                if client is None:     # the SDK client raises here when the PAT has already expired
                    client = self._token_clients[key] = self._token_client_factory(hostname, token)
            return client.access_token()
        except Exception as exc:
            raise MediaError(f"could not exchange the personal access token at {loggable(hostname)}"
                             f"/api/token/refresh/: {type(exc).__name__}") from None

    # ------------------------------------------------------------------ fetch
    def fetch(self, url: str, task_id=None, project_id=None) -> str:
        """The local path of the task's media (downloaded within ``MEDIA_TIMEOUT_S`` in all)."""
        with Deadline(self.config.media_timeout_s) as deadline:
            return self._fetch(url, task_id, project_id, deadline, "the media")

    def open_image(self, url: str, task_id=None, project_id=None) -> ImageRef:
        """The task's picture as an ``ImageRef``: its content key (``file_digest`` of the file) and its size, known
        without decoding once this process has seen the file (remembered while the file is unchanged), so that a
        picture whose features the predictor has cached is never decoded; ``ref.pixels()`` decodes it then. A file
        seen for the first time is decoded here (the key needs the file, the size its pixels: a PNG's orientation
        can only be read after its pixels), with the checks of :meth:`load_image`."""
        with Deadline(self.config.media_timeout_s) as deadline:
            with stage("fetch"):
                path = self._fetch(url, task_id, project_id, deadline, "the image")
        with self._lock:
            identity = self._identities.get(path)
        if identity is not None:
            return ImageRef(identity[0], identity[1], loader=lambda: self._load_image(url, task_id, project_id, path))
        with stage("decode"):
            pixels = self._load_image(url, task_id, project_id, path)
        with stage("key"):
            key = file_digest(path)          # after decoding: a truncated file was replaced by then
        with self._lock:
            self._identities[path] = (key, pixels.shape[:2])
        return ImageRef(key, pixels.shape[:2], loader=lambda: pixels, pixels=pixels)

    def load_image(self, url: str, task_id=None, project_id=None) -> np.ndarray:
        return self._load_image(url, task_id, project_id, None)

    def _load_image(self, url: str, task_id, project_id, fetched: Optional[str]) -> np.ndarray:
        """Decode the picture (``fetched``: its path, already fetched); a cached file that does not decode is dropped
        and downloaded once more."""
        with Deadline(self.config.media_timeout_s) as deadline:     # one deadline for both attempts
            for attempt in (0, 1):
                path = fetched if attempt == 0 and fetched else self._fetch(url, task_id, project_id, deadline,
                                                                            "the image")
                try:
                    return load_image(path, max_pixels=self.config.max_image_pixels)
                except ImageTooLarge as exc:
                    self._count("errors")
                    raise MediaError(f"{_subject('the image', url, task_id)} is too large: {exc} "
                                     f"(MAX_IMAGE_PIXELS)") from None
                except Exception as exc:
                    # a cached file can be truncated (another process was writing it): drop it, download once more
                    if attempt == 0 and self._in_cache(path):
                        self._drop(path)
                        continue
                    self._count("errors")
                    raise MediaError(f"cannot decode image {self._safe_url(url)}: {type(exc).__name__}") from None
        raise AssertionError("unreachable")

    def _fetch(self, url: str, task_id, project_id, deadline: Deadline, what: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise MediaError("task has no media URL")
        url = url.strip()
        hostname, token = self.connection(project_id)
        if url.startswith("file://"):
            raise MediaError("file:// URLs are not served; use Local Storage (/data/local-files/?d=...)")
        try:
            access = self._auth_token(hostname, token)
            path = self._download(url, task_id, hostname, access, deadline)
        except MediaError:
            self._count("errors")
            raise
        except Exception as exc:
            self._count("errors")
            raise MediaError(self._describe_error(url, exc, hostname, token, _subject(what, url, task_id))) from None
        if not os.path.exists(path):
            self._count("errors")
            raise MediaError(f"media file not found after download: {self._safe_url(url)}")
        new = not self._is_known(path)
        self._count("misses" if new else "hits")
        if new:
            with self._lock:
                self._identities.pop(path, None)     # a new or changed file: identify it again
        self._touch(path)
        if new:
            self._evict()
        return path

    def _download(self, url: str, task_id, hostname: Optional[str], access: Optional[str], deadline: Deadline) -> str:
        """``get_local_path`` with this fetcher's local-files resolver and a guarded session for this fetch."""
        policy = replace(self._addresses, trusted_origins=self.trusted_origins(hostname))
        lock = self._url_locks[hash(url) % len(self._url_locks)]
        if not lock.acquire(timeout=deadline.remaining(url)):    # another thread is downloading the same URL
            raise deadline.error(url)
        try:
            with GuardedSession(policy, deadline, self.max_download_bytes) as session, \
                    _ls_io.local_files_resolver(self._resolve_local_file), _ls_io.http_session(session):
                return _ls_io.get_local_path(url, cache_dir=self.cache_dir, hostname=hostname or "",
                                             access_token=access or "", image_dir=self._no_local_uploads,
                                             download_resources=True, task_id=task_id)
        finally:
            lock.release()

    def _in_cache(self, path: str) -> bool:
        return os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.cache_dir)

    def _drop(self, path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass
        with self._lock:
            self._known.pop(path, None)
            self._identities.pop(path, None)

    # ------------------------------------------------------------------ local files
    def _resolve_local_file(self, relative_path: str) -> Optional[str]:
        """Resolver for ``/data/local-files/?d=...``: a path whose real location (symlinks resolved) is under
        LOCAL_FILES_DOCUMENT_ROOT, or None (then the SDK raises FileNotFoundError; without a root we return a path
        that does not exist so it downloads via LS)."""
        root = self.config.local_files_document_root
        if not root or os.path.abspath(root) == os.path.abspath(os.sep):
            # no root: a non-existing path makes the SDK download the file from LS instead
            return os.path.join(self._no_local_uploads, "missing")
        real_root = os.path.realpath(root)
        try:
            real = os.path.realpath(_ls_io.safe_build_path(root, relative_path.lstrip("/")))
        except ValueError:
            return None
        if os.path.commonpath([real, real_root]) != real_root:
            logger.warning("Local Storage path %s leaves LOCAL_FILES_DOCUMENT_ROOT through a symlink: refused",
                           loggable(relative_path))
            return None
        return real

    # ------------------------------------------------------------------ cache bound
    def _is_known(self, path: str) -> bool:
        """True when ``path`` is a cached file this process served before, unchanged since (a cache hit)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        with self._lock:
            return self._known.get(path) == (st.st_size, st.st_mtime_ns)

    def _touch(self, path: str) -> None:
        """Mark as recently used (eviction is oldest-mtime first) and remember it for hit counting."""
        try:
            os.utime(path, None)
            st = os.stat(path)
        except OSError:
            return
        with self._lock:
            self._known[path] = (st.st_size, st.st_mtime_ns)

    def _evict(self) -> None:
        with self._evict_lock:
            try:
                entries = []
                with os.scandir(self.cache_dir) as it:
                    for e in it:
                        if e.is_file():
                            st = e.stat()
                            entries.append((st.st_mtime, st.st_size, e.path))
            except FileNotFoundError:
                return
            total = sum(size for _, size, _ in entries)
            if total <= self.max_bytes:
                return
            entries.sort()
            for _, size, path in entries[:-1]:          # never evict the newest (just downloaded) file
                if total <= self.max_bytes:
                    break
                try:
                    os.remove(path)
                    total -= size
                    self._count("evicted_files")
                    with self._lock:
                        self._known.pop(path, None)
                        self._identities.pop(path, None)
                except OSError:
                    pass

    def _count(self, key: str) -> None:
        with self._lock:
            self._counters[key] += 1

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._counters)
        lookups = out["hits"] + out["misses"]
        out["hit_rate"] = (out["hits"] / lookups) if lookups else None
        try:
            with os.scandir(self.cache_dir) as it:
                out["cache_bytes"] = sum(e.stat().st_size for e in it if e.is_file())
        except FileNotFoundError:
            out["cache_bytes"] = 0
        out["cache_limit_bytes"] = self.max_bytes
        return out

    # ------------------------------------------------------------------ messages
    @staticmethod
    def _safe_url(url: str) -> str:
        """A URL fit for messages and logs: without its query string (presigned URLs carry credentials there), on
        one line, at most 300 characters."""
        p = urlparse(url)
        if p.scheme in ("http", "https") and p.query and "local-files" not in p.path:
            url = f"{p.scheme}://{p.netloc}{p.path}?..."
        return loggable(url)

    def _describe_error(self, url: str, exc: Exception, hostname, token, subject: str) -> str:
        """The client-facing message. A network failure at a host other than Label Studio's gets one coarse text
        whatever happened (a closed port and an HTTP 404 must look alike); the precise reason goes to the log."""
        if isinstance(exc, DownloadLimitExceeded):
            return f"{subject} {exc}"
        failed = _failed_url(exc) or url
        network = isinstance(exc, (requests.RequestException, DownloadError))
        if network and url_origin(failed) not in self.trusted_origins(hostname):
            logger.warning("cannot download %s from %s: %s", subject, self._safe_url(failed),
                           loggable(_network_detail(exc), limit=None))
            return f"cannot download {subject}"
        return self._describe_ls_error(url, exc, hostname, token)

    def _describe_ls_error(self, url: str, exc: Exception, hostname, token) -> str:
        safe = self._safe_url(url)
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            hint = ""
            if code == 401:
                hint = (" (check LABEL_STUDIO_API_KEY: a legacy token needs legacy tokens enabled in the organization,"
                        " a personal access token needs label-studio-sdk>=2.0.14)")
            elif code == 403:
                hint = " (the file is missing, or the token's user cannot access it)"
            return f"download of {safe} failed: HTTP {code}{hint}"
        if isinstance(exc, FileNotFoundError):
            if not hostname:
                return (f"cannot resolve {safe}: no Label Studio host (set LABEL_STUDIO_URL, or connect the backend"
                        f" so that /setup provides it)")
            if not token and self.config.label_studio_api_key:
                return (f"cannot download {safe}: LABEL_STUDIO_API_KEY is not sent to {loggable(hostname)} (the /setup "
                        f"host): set LABEL_STUDIO_URL, or list it in LABEL_STUDIO_ALLOWED_HOSTS")
            if not token:
                return f"cannot download {safe}: no Label Studio token (set LABEL_STUDIO_API_KEY)"
            return f"media not found: {safe}"
        if isinstance(exc, (requests.ConnectionError, DownloadError)):
            return f"cannot connect to download {safe}"
        if isinstance(exc, requests.Timeout):
            return f"timed out downloading {safe}"
        if isinstance(exc, ValueError):
            return f"invalid media URL {safe}: {loggable(exc)}"
        return f"cannot read {safe}: {type(exc).__name__}"


def _subject(what: str, url: str, task_id) -> str:
    """``the image of task 7``; ``the image <url>`` when the task has no id."""
    if task_id is not None:
        return f"{what} of task {loggable(task_id, limit=40)}"
    return f"{what} {MediaFetcher._safe_url(url)}"


def _failed_url(exc: Exception) -> Optional[str]:
    """The URL a download failed at (after redirects), when the exception tells."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "url", None):
        return response.url
    request = getattr(exc, "request", None)
    return getattr(request, "url", None) or getattr(exc, "url", None)


def _network_detail(exc: Exception) -> str:
    """What the log says about a failed download: the status and URL, the refused address, the socket error."""
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code} from {MediaFetcher._safe_url(response.url)}"
    return _QUERY.sub("?...", f"{type(exc).__name__}: {exc}")      # urllib3 names the URL, query included


_QUERY = re.compile(r"\?[^\s'\")]+")
