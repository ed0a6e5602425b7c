"""One predictor per worker process: lazy loading, a stable ``model_version``, hot reload of published versions.

- Nothing is loaded at import or in ``/setup``: the first prediction loads the model (or ``warm_up()`` when
  ``PRELOAD_MODEL`` is on, in the worker after the fork — never in the gunicorn master).
- ``version`` is known without loading weights: the published version (``MODEL_DIR/versions/current.json``, see
  ``backend.learning.versions``) when there is one, else ``<variant>-<first 8 hex of the checkpoint's SHA-256>``
  (the packaged demo bundle when ``SSP_SAM_VARIANT=demo`` and no checkpoint is given; ``<variant>-random`` without
  any checkpoint), the same rule as ``ssp_sam.build.load_model``. A predictor is always labelled with the version it
  was loaded for, so ``/setup`` and every prediction carry the same string.
- Hot reload: at most every ``RELOAD_INTERVAL_S`` a request stats the pointer. A new version becomes the *target*;
  while a predictor is serving, the target is loaded in a background thread and swapped in atomically, requests
  keep the old predictor meanwhile. A failed load is logged and the old predictor keeps serving (the pointer is
  tried again when it changes).
- Pointer checks are serialised (``_check_lock``): a check decides on the signature it read, so a slow check can
  never apply an old observation ("no pointer") after a newer one was applied (that race once reloaded the base
  model over a just-published version).
- Weights (``backend.weights``): ``SSP_SAM_WEIGHTS_DIR`` names the configured checkpoint; with ``AUTO_DOWNLOAD`` the
  missing official weights download in the background (:class:`backend.weights.AutoDownload`) while ``version`` is
  ``<variant>-downloading`` and ``get()`` raises :class:`backend.weights.WeightsNotReady` at once (``/predict``
  answers 503 with how far it is); once complete the folder is used as if ``SSP_SAM_WEIGHTS_DIR`` named it and the
  model loads. An official variant without any weights is an error that names the command to run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from backend.learning import versions
from backend.weights import (AutoDownload, WeightsMissing, WeightsNotReady, missing_weights_message,
                             weights_checkpoint, with_weights_dir)
from ssp_sam.versioning import DEMO_CHECKPOINT, weights_version

logger = logging.getLogger(__name__)

PredictorFactory = Callable[[Any, Optional[str]], Any]   # (config, checkpoint path or None) -> predictor
_UNSEEN = object()                                       # the pointer has not been looked at yet


@dataclass(frozen=True)
class Target:
    """What should be served: a version string and the checkpoint that holds it."""
    version: str
    checkpoint: Optional[str]
    source: str                       # "pointer" | "config" | "weights_dir" | "demo" | "random"

    def same(self, other: Optional["Target"]) -> bool:
        return other is not None and (self.version, self.checkpoint) == (other.version, other.checkpoint)


@dataclass(frozen=True)
class Served:
    predictor: Any
    version: str
    target: Target
    loaded_at: float


def default_predictor_factory(config, checkpoint: Optional[str]):
    """Build the real SSP-SAM predictor (imports torch; call only inside a worker)."""
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.predictor import SSPSAMPredictor

    cfg = ModelConfig(variant=config.variant, checkpoint=checkpoint, sam_checkpoint=config.sam_checkpoint,
                      clip_checkpoint=config.clip_checkpoint, weights_dir=config.weights_dir, device=config.device,
                      dtype=config.dtype, sdpa=config.sdpa, compile=config.torch_compile)
    return SSPSAMPredictor(load_model(cfg), threshold=config.mask_threshold,
                           cache_bytes=int(config.embedding_cache_mb) * 2**20)


def base_target(config) -> Target:
    """The configured model (no published version)."""
    if config.checkpoint:
        if not os.path.exists(config.checkpoint):
            raise FileNotFoundError(f"SSP_SAM_CHECKPOINT does not exist: {config.checkpoint}")
        return Target(weights_version(config.variant, config.checkpoint), config.checkpoint, "config")
    checkpoint = weights_checkpoint(config)
    if checkpoint is not None:
        return Target(weights_version(config.variant, checkpoint), checkpoint, "weights_dir")
    problem = missing_weights_message(config)
    if problem:
        raise WeightsMissing(problem)
    if config.variant == "demo":
        if not DEMO_CHECKPOINT.exists():
            raise FileNotFoundError(f"the packaged demo model is missing: {DEMO_CHECKPOINT}")
        return Target(weights_version("demo", None), None, "demo")
    return Target(weights_version(config.variant, None), None, "random")


class ModelManager:
    def __init__(self, config, predictor_factory: Optional[PredictorFactory] = None,
                 clock: Callable[[], float] = time.monotonic, auto_download: Optional[AutoDownload] = None):
        self.config = config
        self._factory = predictor_factory or default_predictor_factory
        self._clock = clock
        self._lock = threading.Lock()             # guards _target, _served, _bg, _last_check
        self._check_lock = threading.Lock()       # one pointer check at a time (see the module doc)
        self._load_lock = threading.Lock()        # one load at a time per process
        self._target: Optional[Target] = None
        self._served: Optional[Served] = None
        self._pointer_sig: Any = _UNSEEN
        self._last_check = float("-inf")
        self._bg: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self.reloads = 0
        self.load_seconds: Optional[float] = None
        self.auto = auto_download if auto_download is not None else AutoDownload.for_config(config)
        if self.auto is not None:
            self.auto.on_ready = self._safe_get           # when the weights are complete, the model loads

    # ------------------------------------------------------------------ public API
    @property
    def version(self) -> str:
        """The ``model_version`` to report now (cheap: never loads weights); ``<variant>-downloading`` while
        AUTO_DOWNLOAD fetches the weights."""
        self.check_for_update()
        served = self._served
        if served is not None:
            return served.version
        if not self._weights_ready():
            return f"{self.config.variant}-downloading"
        return self._current_target().version

    @property
    def loaded(self) -> bool:
        return self._served is not None

    @property
    def loading(self) -> bool:
        bg = self._bg
        return (bg is not None and bg.is_alive()) or self._load_lock.locked()

    def get(self) -> Served:
        """The predictor to use for one request (loads it on first use, blocking). Snapshot it once per request:
        a concurrent hot swap does not change what this request uses. Raises WeightsNotReady at once while
        AUTO_DOWNLOAD fetches the weights."""
        self.check_for_update()
        served = self._served
        if served is not None:
            return served
        self._model_config()
        with self._load_lock:
            if self._served is not None:
                return self._served
            served = self._load(self._current_target())
            with self._lock:
                self._served = served
                newer = not served.target.same(self._target)
            if newer:                 # a version was published while this one loaded: swap it in next
                self._start_reload()
            return served

    def warm_up(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self._safe_get, name="ssp-sam-warmup", daemon=True).start()
        else:
            self.get()

    def _safe_get(self):
        try:
            self.get()
        except WeightsNotReady as exc:
            logger.info("model not loaded yet: %s", exc)
        except Exception:
            logger.exception("model warm-up failed")

    # ------------------------------------------------------------------ weights
    def _weights_ready(self) -> bool:
        auto = self.auto
        if auto is None or auto.ready:
            return True
        auto.start()
        return False

    def _model_config(self):
        """The configuration models load with: with AUTO_DOWNLOAD, its folder once complete (as if
        SSP_SAM_WEIGHTS_DIR named it); raises WeightsNotReady before."""
        auto = self.auto
        if auto is None:
            return self.config
        if not self._weights_ready():
            raise WeightsNotReady(auto.message())
        if self.config.weights_dir != auto.folder:
            self.config = with_weights_dir(self.config, auto.folder)
        return self.config

    def stop(self) -> None:
        if self.auto is not None:
            self.auto.stop()

    # ------------------------------------------------------------------ targets
    def _current_target(self) -> Target:
        config = self._model_config()
        with self._lock:
            if self._target is None:
                self._target = base_target(config)
            return self._target

    def check_for_update(self, force: bool = False) -> bool:
        """Stat the pointer (at most every RELOAD_INTERVAL_S); adopt the version it names as the target, and start a
        background reload when a predictor is serving. Returns True when the target changed."""
        now = self._clock()
        with self._lock:
            if not force and now - self._last_check < self.config.reload_interval_s:
                return False
            self._last_check = now
        with self._check_lock:
            sig = versions.pointer_signature(self.config.model_dir)
            if sig == self._pointer_sig:
                return False
            self._pointer_sig = sig
            target = self._pointer_target(sig)
            if target is None:
                return False
            with self._lock:
                if target.same(self._target):
                    return False
                self._target = target
                serving = self._served is not None
            logger.info("model version %s is now the target%s", target.version,
                        "; loading it in the background" if serving else "; it loads on first use")
        if serving:
            self._start_reload()
        return True

    def _pointer_target(self, sig) -> Optional[Target]:
        """The target the pointer asks for: its version, or the configured model when there is no pointer; None
        when the pointer is unusable (then whatever is served stays)."""
        if sig is None:
            try:
                return base_target(self._model_config())
            except WeightsNotReady:
                return None                # the base target is decided once the weights are complete
            except Exception as exc:
                self.last_error = f"the configured model is unusable: {exc}"
                logger.error("%s", self.last_error)
                return None
        published = versions.read_current(self.config.model_dir)
        return Target(published.version, published.path, "pointer") if published is not None else None

    # ------------------------------------------------------------------ loading
    def _load(self, target: Target) -> Served:
        t0 = time.perf_counter()
        logger.info("loading model version %s (%s%s)", target.version, target.source,
                    f": {target.checkpoint}" if target.checkpoint else "")
        try:
            predictor = self._factory(self._model_config(), target.checkpoint)
        except Exception as exc:
            self.last_error = f"loading {target.version} failed: {type(exc).__name__}: {exc}"
            raise
        self.load_seconds = time.perf_counter() - t0
        logger.info("model version %s loaded in %.1f s (pid %d)", target.version, self.load_seconds, os.getpid())
        self.last_error = None
        return Served(predictor=predictor, version=target.version, target=target, loaded_at=time.time())

    def _start_reload(self) -> None:
        with self._lock:
            if self._bg is not None:          # a reload is running: it picks up the newest target when done
                return
            self._bg = threading.Thread(target=self._reload_loop, name="ssp-sam-reload", daemon=True)
            self._bg.start()

    def _reload_loop(self) -> None:
        """Load the target until what is served is the target (it may change while a load runs)."""
        while True:
            with self._lock:
                target, served = self._target, self._served
                if target is None or served is None or target.same(served.target):
                    self._bg = None
                    return
            try:
                with self._load_lock:
                    fresh = self._load(target)
            except Exception:
                logger.exception("hot reload of %s failed; still serving %s", target.version, served.version)
                with self._lock:
                    if self._target is target:  # give up on this target until the pointer changes again
                        self._target = served.target
                continue
            with self._lock:
                self._served = fresh
                self.reloads += 1
            logger.info("hot reload: now serving %s (was %s)", fresh.version, served.version)

    def wait_for_reload(self, timeout: float = 30.0) -> bool:
        """Wait until no background reload is running (tests, the trainer's smoke checks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bg = self._bg
            if bg is None:
                return True
            bg.join(max(0.0, deadline - time.monotonic()))
        return self._bg is None

    # ------------------------------------------------------------------ reporting
    def info(self) -> dict:
        served = self._served
        out = {"pid": os.getpid(), "model_version": self.version, "model_loaded": served is not None,
               "loading": self.loading, "reloads": self.reloads, "load_seconds": self.load_seconds,
               "last_error": self.last_error}
        if self.auto is not None:
            out["weights"] = self.auto.status()
            if out["weights"]["error"] and not out["last_error"]:
                out["last_error"] = out["weights"]["error"]
        if served is not None:
            out["source"] = served.target.source
            device = getattr(served.predictor, "device", None)
            if device is not None:
                out["device"] = str(device)
        return out

    def cache_stats(self) -> Optional[dict]:
        """Embedding-cache statistics of the served predictor, with a hit rate next to every hits/misses pair."""
        served = self._served
        stats = getattr(served.predictor, "cache_stats", None) if served is not None else None
        if not callable(stats):
            return None
        try:
            return _with_hit_rates(dict(stats()))
        except Exception:
            logger.exception("cache_stats failed")
            return None


def _with_hit_rates(stats: dict) -> dict:
    out = {k: _with_hit_rates(v) if isinstance(v, dict) else v for k, v in stats.items()}
    if "hits" in out and "misses" in out and "hit_rate" not in out:
        total = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / total if total else None
    return out
