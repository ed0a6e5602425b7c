"""Where the served model's weights come from, for the backend and the trainer alike.

1. ``SSP_SAM_CHECKPOINT`` / ``SAM_CHECKPOINT`` / ``CLIP_CHECKPOINT``: explicit files, always first;
2. ``SSP_SAM_WEIGHTS_DIR``: a folder ``ssp-sam download-weights`` wrote (its files fill in the ones not given);
3. ``AUTO_DOWNLOAD=true``, an official variant, no ``SSP_SAM_CHECKPOINT`` and no complete weights folder: the folder
   ``SSP_SAM_WEIGHTS_DIR`` names, else ``MODEL_DIR/weights/<variant>-<dataset>``, downloaded in the background by
   :class:`AutoDownload` (the backend) or before the first round (the trainer, :func:`trainer_weights_dir`);
4. an official variant with none of these: an error that names the command to run (:func:`missing_weights_message`).

Downloads go through :func:`ssp_sam.hub.download_weights`, whose lock on the folder makes gunicorn workers, replicas
and the trainer sharing ``MODEL_DIR`` download once: the others wait, then find the files verified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Optional

from ssp_sam import hub

logger = logging.getLogger(__name__)

RETRY_S = 60.0           # after a failed download, AUTO_DOWNLOAD tries again this many seconds later


class WeightsNotReady(RuntimeError):
    """The official weights are still downloading (or failed and wait for their retry); the message says how far."""


class WeightsMissing(RuntimeError):
    """An official variant is configured without any weights; the message names the command that fetches them."""


def is_official(variant: str) -> bool:
    return variant in hub.OFFICIAL_WEIGHTS


def auto_weights_dir(config) -> str:
    """The folder AUTO_DOWNLOAD fills: ``SSP_SAM_WEIGHTS_DIR``, else ``MODEL_DIR/weights/<variant>-<dataset>``."""
    return config.weights_dir or os.path.join(config.model_dir, "weights", f"{config.variant}-{config.dataset}")


def uses_auto_download(config) -> bool:
    """AUTO_DOWNLOAD applies: it is on, the variant is official, no checkpoint is given, and no complete weights
    folder is."""
    if not (config.auto_download and is_official(config.variant)) or config.checkpoint:
        return False
    return not config.weights_dir or not hub.folder_complete(config.weights_dir)


def missing_weights_message(config) -> Optional[str]:
    """Why the configured model cannot be served without weights it lacks; None when nothing is missing."""
    if (not is_official(config.variant) or config.checkpoint or config.weights_dir or config.sam_checkpoint
            or config.clip_checkpoint or config.auto_download):
        return None
    out = auto_weights_dir(config)
    return (f"SSP_SAM_VARIANT={config.variant} needs its official weights: run "
            f"`{hub.download_command(config.variant, config.dataset, out)}` and set SSP_SAM_WEIGHTS_DIR={out} "
            f"(or set AUTO_DOWNLOAD=true to download them into MODEL_DIR at start)")


def weights_problem(config) -> Optional[str]:
    """What keeps the configured weights from being used, found without loading them (``ssp-sam serve`` checks it
    before starting): an official variant without weights, or a weights folder that lacks a file."""
    message = missing_weights_message(config)
    if message or not config.weights_dir or uses_auto_download(config):
        return message
    try:
        manifest = hub.read_manifest(config.weights_dir)
    except hub.WeightsError as exc:
        return f"SSP_SAM_WEIGHTS_DIR: {exc}"
    missing = manifest.missing()
    if missing:
        return (f"SSP_SAM_WEIGHTS_DIR={manifest.folder} lacks {', '.join(missing)}: run "
                f"`{hub.download_command(manifest.variant, manifest.dataset, str(manifest.folder))}` again")
    return None


def weights_checkpoint(config) -> Optional[str]:
    """The SSP-SAM checkpoint of ``config.weights_dir`` (None without one). Its SHA-256 from the manifest is handed to
    ``ssp_sam.versioning``, so the version string needs no pass over the file while it is unchanged."""
    if not config.weights_dir:
        return None
    from ssp_sam.versioning import remember_digest

    manifest = hub.read_manifest(config.weights_dir)
    path = manifest.path("checkpoint")
    rec = manifest.files["checkpoint"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SSP_SAM_WEIGHTS_DIR={manifest.folder} lacks {rec['name']}: run "
                                f"`{hub.download_command(manifest.variant, manifest.dataset, str(manifest.folder))}`")
    if rec.get("sha256") and rec.get("mtime_ns") is not None:
        remember_digest(path, rec["sha256"], int(rec.get("size") or -1), int(rec["mtime_ns"]))
    return path


def trainer_weights_dir(config) -> Optional[str]:
    """For ``ssp-sam finetune``: the weights folder to train from, downloading it first (blocking, with progress)
    when AUTO_DOWNLOAD applies; a backend downloading into the same folder is waited for."""
    if not uses_auto_download(config):
        return config.weights_dir
    folder = auto_weights_dir(config)
    if not hub.folder_complete(folder, config.variant, config.dataset):
        logger.info("AUTO_DOWNLOAD: fetching the %s weights into %s", config.variant, folder)
        hub.download_weights(config.variant, config.dataset, folder)
    return folder


class AutoDownload:
    """The backend's background download of AUTO_DOWNLOAD's folder: started on first use, retried every
    ``retry_s`` after a failure, ``on_ready`` called once the folder is complete."""

    def __init__(self, variant: str, dataset: str, folder: str, retry_s: Optional[float] = None,
                 download: Optional[Callable[..., object]] = None):
        self.variant, self.dataset, self.folder = variant, dataset, folder
        self.retry_s = RETRY_S if retry_s is None else retry_s
        self._download = download or hub.download_weights
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.progress: Optional[hub.DownloadProgress] = None
        self.error: Optional[str] = None
        self.retry_at: Optional[float] = None
        self.attempts = 0
        self.on_ready: Optional[Callable[[], None]] = None

    @classmethod
    def for_config(cls, config) -> Optional["AutoDownload"]:
        if not uses_auto_download(config):
            return None
        return cls(config.variant, config.dataset, auto_weights_dir(config))

    @property
    def ready(self) -> bool:
        """The folder is complete (downloaded by this process, another one, or earlier)."""
        if not self._ready.is_set() and hub.folder_complete(self.folder, self.variant, self.dataset):
            self._ready.set()
        return self._ready.is_set()

    def start(self) -> None:
        """Start the download thread unless it runs or the folder is complete."""
        with self._lock:
            if self._ready.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            if self.ready:
                return
            self._thread = threading.Thread(target=self._run, name="ssp-sam-weights", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def retry_now(self) -> None:
        """End the wait after a failure at once (the next attempt starts now)."""
        self._wake.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    def _on_progress(self, progress: hub.DownloadProgress) -> None:
        self.progress = progress

    def _run(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            logger.info("AUTO_DOWNLOAD: fetching the %s weights (%s) into %s", self.variant, self.dataset, self.folder)
            try:
                self._download(self.variant, self.dataset, self.folder, progress=self._on_progress, quiet=True)
            except Exception as exc:  # noqa: BLE001 - reported in /health and retried
                reason = str(exc) if isinstance(exc, hub.WeightsError) else f"{type(exc).__name__}: {exc}"
                self.error = f"downloading the {self.variant} weights failed: {reason}"
                self.retry_at = time.monotonic() + self.retry_s
                logger.error("%s; trying again in %.0f s", self.error, self.retry_s)
                self._wake.wait(self.retry_s)
                self._wake.clear()
                if self._stop.is_set():
                    return
                continue
            self.error, self.retry_at = None, None
            self._ready.set()
            logger.info("AUTO_DOWNLOAD: the %s weights are in %s", self.variant, self.folder)
            break
        callback = self.on_ready
        if self._ready.is_set() and callback is not None:
            callback()

    def state(self) -> str:
        if self.ready:
            return "ready"
        if self.error:
            return "failed"
        progress = self.progress
        return "waiting" if progress is not None and progress.state == "waiting" else "downloading"

    def message(self) -> str:
        """What ``/predict`` answers meanwhile."""
        state, progress = self.state(), self.progress
        if state == "failed":
            wait = max(0.0, (self.retry_at or time.monotonic()) - time.monotonic())
            return f"model weights could not be downloaded ({self.error}); trying again in {wait:.0f} s"
        where = " by another process" if state == "waiting" else ""
        done = progress.describe() if progress is not None else "starting"
        return f"model weights are downloading{where} ({done})"

    def status(self) -> dict:
        """For ``/health``."""
        progress = self.progress or hub.DownloadProgress(state="starting")
        out = {"state": self.state(), "dir": self.folder, "variant": self.variant, "dataset": self.dataset,
               "file": progress.file, "bytes_done": progress.bytes_done, "bytes_total": progress.bytes_total,
               "attempts": self.attempts, "error": self.error}
        if out["state"] == "ready":
            out.update(file=None, bytes_done=None, bytes_total=None)
        return out


def with_weights_dir(config, folder: str):
    """``config`` with its weights folder set (after AUTO_DOWNLOAD filled it)."""
    return dataclasses.replace(config, weights_dir=folder)
