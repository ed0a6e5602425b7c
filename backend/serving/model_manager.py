"""One predictor per worker process: lazy loading, a stable ``model_version``, hot reload of published versions.

- Nothing is loaded at import or in ``/setup``: the first prediction loads the model (or ``warm_up()`` when
  ``PRELOAD_MODEL`` is on, in the worker after the fork — never in the gunicorn master).
- ``version`` is known without loading weights: the ``version`` of the published pointer
  ``MODEL_DIR/versions/current.json`` when there is one, else ``<variant>-<first 8 hex of the checkpoint's SHA-256>``
  (the packaged demo bundle when ``SSP_SAM_VARIANT=demo`` and no checkpoint is given; ``<variant>-random`` without
  any checkpoint), the same rule as ``ssp_sam.build.load_model``. The served predictor is always labelled with the
  version it was loaded for, so ``/setup`` and every prediction carry the same string.
- Hot reload: at most every ``RELOAD_INTERVAL_S`` (2 s) a request stats the pointer; when its content names a new
  version, that version is loaded in a background thread while requests keep using the old predictor, then swapped
  in atomically. A failed load is logged and the old predictor keeps serving (retried when the pointer changes).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ssp_sam.versioning import DEMO_CHECKPOINT, weights_version

logger = logging.getLogger(__name__)

PredictorFactory = Callable[[Any, Optional[str]], Any]   # (config, checkpoint path or None) -> predictor


@dataclass(frozen=True)
class Target:
    """What should be served: a version string and the checkpoint that holds it."""
    version: str
    checkpoint: Optional[str]
    source: str                       # "pointer" | "config" | "demo" | "random"
    meta: Optional[dict] = None


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
                      clip_checkpoint=config.clip_checkpoint, device=config.device, dtype=config.dtype)
    loaded = load_model(cfg)
    return SSPSAMPredictor(loaded, threshold=config.mask_threshold,
                           cache_bytes=int(config.embedding_cache_mb) * 2**20)


class ModelManager:
    def __init__(self, config, predictor_factory: Optional[PredictorFactory] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._factory = predictor_factory or default_predictor_factory
        self._clock = clock
        self._state_lock = threading.Lock()       # guards _served, _target, _pointer_sig, _bg
        self._load_lock = threading.Lock()        # one load at a time per process
        self._served: Optional[Served] = None
        self._target: Optional[Target] = None
        self._pointer_sig = None
        self._last_check = float("-inf")
        self._bg: Optional[threading.Thread] = None
        self._failed_versions: set = set()
        self.last_error: Optional[str] = None
        self.reloads = 0
        self.load_seconds: Optional[float] = None

    # ------------------------------------------------------------------ targets
    def _base_target(self) -> Target:
        cfg = self.config
        ckpt = cfg.checkpoint
        if ckpt:
            if not os.path.exists(ckpt):
                raise FileNotFoundError(f"SSP_SAM_CHECKPOINT does not exist: {ckpt}")
            return Target(weights_version(cfg.variant, ckpt), ckpt, "config")
        if cfg.variant == "demo":
            if DEMO_CHECKPOINT.exists():
                return Target(weights_version("demo", None), None, "demo")
            return Target("demo-missing", None, "demo")
        return Target(weights_version(cfg.variant, None), None, "random")

    def _pointer_signature(self):
        try:
            st = os.stat(self.config.version_pointer)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_pointer(self) -> Optional[Target]:
        path = self.config.version_pointer
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable version pointer %s: %s", path, exc)
            return None
        if not isinstance(data, dict) or not data.get("version") or not data.get("path"):
            logger.warning("ignoring version pointer %s without 'version' and 'path'", path)
            return None
        ckpt = str(data["path"])
        if not os.path.isabs(ckpt):
            for base in (os.path.dirname(path), self.config.model_dir, os.getcwd()):
                cand = os.path.join(base, ckpt)
                if os.path.exists(cand):
                    ckpt = cand
                    break
        if not os.path.exists(ckpt):
            logger.warning("version pointer %s names a missing checkpoint %s; ignored", path, ckpt)
            return None
        return Target(str(data["version"]), os.path.abspath(ckpt), "pointer", meta=data)

    def _resolve_target(self) -> Target:
        return self._read_pointer() or self._base_target()

    # ------------------------------------------------------------------ public API
    @property
    def version(self) -> str:
        """The ``model_version`` to report now (cheap: never loads weights)."""
        self.check_for_update()
        with self._state_lock:
            if self._served is not None:
                return self._served.version
            if self._target is not None:
                return self._target.version
        target = self._resolve_target()
        with self._state_lock:
            if self._target is None:
                self._target = target
            return self._served.version if self._served is not None else self._target.version

    @property
    def loaded(self) -> bool:
        return self._served is not None

    @property
    def loading(self) -> bool:
        bg = self._bg
        return (bg is not None and bg.is_alive()) or self._load_lock.locked()

    def get(self) -> Served:
        """The predictor to use for one request (loads it on first use, blocking). Snapshot it once per request:
        a concurrent hot swap does not change what this request uses."""
        self.check_for_update()
        served = self._served
        if served is not None:
            return served
        with self._load_lock:
            if self._served is not None:
                return self._served
            with self._state_lock:
                target = self._target
            if target is None:
                target = self._resolve_target()
            try:
                served = self._load(target)
            except Exception as exc:
                self.last_error = f"loading {target.version} failed: {type(exc).__name__}: {exc}"
                raise
            with self._state_lock:
                self._served = served
                self._target = served.target
            return served

    def warm_up(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self._safe_get, name="ssp-sam-warmup", daemon=True).start()
        else:
            self.get()

    def _safe_get(self):
        try:
            self.get()
        except Exception:
            logger.exception("model warm-up failed")

    def _load(self, target: Target) -> Served:
        t0 = time.perf_counter()
        logger.info("loading model version %s (%s%s)", target.version, target.source,
                    f": {target.checkpoint}" if target.checkpoint else "")
        predictor = self._factory(self.config, target.checkpoint)
        self.load_seconds = time.perf_counter() - t0
        loaded_version = getattr(predictor, "version", None)
        if loaded_version and loaded_version != target.version and target.source != "pointer":
            logger.warning("the model reports version %s; serving it as %s (the version /setup announced)",
                           loaded_version, target.version)
        logger.info("model version %s loaded in %.1f s (pid %d)", target.version, self.load_seconds, os.getpid())
        self.last_error = None
        return Served(predictor=predictor, version=target.version, target=target, loaded_at=time.time())

    # ------------------------------------------------------------------ hot reload
    def check_for_update(self, force: bool = False) -> bool:
        """Stat the pointer (at most every RELOAD_INTERVAL_S); start a background reload when it names a new version.
        Returns True when a new target was adopted."""
        now = self._clock()
        with self._state_lock:
            if not force and now - self._last_check < self.config.reload_interval_s:
                return False
            self._last_check = now
        sig = self._pointer_signature()
        with self._state_lock:
            if sig == self._pointer_sig:
                return False
            self._pointer_sig = sig
        target = self._read_pointer() if sig is not None else None
        if target is None:
            if sig is None and self._target is not None and self._target.source == "pointer":
                # pointer removed: go back to the configured model
                try:
                    target = self._base_target()
                except Exception as exc:
                    logger.error("pointer removed and the configured model is unusable: %s", exc)
                    return False
            else:
                return False
        with self._state_lock:
            current = self._served.target if self._served is not None else self._target
            if current is not None and current.version == target.version and current.checkpoint == target.checkpoint:
                return False
            if self._served is None:
                # nothing loaded yet: the next get() loads the new target directly
                self._target = target
                logger.info("new model version %s published; it will be loaded on first use", target.version)
                return True
            if self._bg is not None:          # a reload is running: it picks this one up when done
                self._pending = target
                return True
            self._target = target
            self._bg = threading.Thread(target=self._background_reload, args=(target,), name="ssp-sam-reload",
                                        daemon=True)
            self._bg.start()
        return True

    _pending: Optional[Target] = None

    def _background_reload(self, target: Target) -> None:
        while target is not None:
            try:
                with self._load_lock:
                    served = self._load(target)
                with self._state_lock:
                    old = self._served
                    self._served = served
                    self.reloads += 1
                logger.info("hot reload: now serving %s (was %s)", served.version, old.version if old else None)
            except Exception as exc:
                self.last_error = f"loading {target.version} failed: {type(exc).__name__}: {exc}"
                logger.exception("hot reload of %s failed; still serving %s", target.version,
                                 self._served.version if self._served else None)
                with self._state_lock:
                    if self._served is not None:
                        self._target = self._served.target
            with self._state_lock:
                target, self._pending = self._pending, None
                if target is None:
                    self._bg = None

    def wait_for_reload(self, timeout: float = 30.0) -> bool:
        """Test helper: wait until no background reload is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            bg = self._bg
            if bg is None:
                return True
            bg.join(max(0.0, deadline - time.monotonic()))
        return self._bg is None

    def info(self) -> dict:
        served = self._served
        out = {
            "pid": os.getpid(),
            "model_version": self.version,
            "model_loaded": served is not None,
            "loading": self.loading,
            "reloads": self.reloads,
            "load_seconds": self.load_seconds,
            "last_error": self.last_error,
        }
        if served is not None:
            out["source"] = served.target.source
            pred = served.predictor
            for attr in ("device",):
                value = getattr(pred, attr, None) or getattr(getattr(pred, "loaded", None), attr, None)
                if value is not None:
                    out[attr] = str(value)
        return out

    def cache_stats(self) -> Optional[dict]:
        """Embedding-cache statistics of the served predictor, if it exposes them."""
        served = self._served
        if served is None:
            return None
        pred = served.predictor
        for name in ("cache_stats", "cache_info", "stats"):
            fn = getattr(pred, name, None)
            if callable(fn):
                try:
                    value = fn()
                    return _with_hit_rates(dict(value)) if isinstance(value, dict) else {"info": str(value)}
                except Exception:
                    return None
        return None


def _with_hit_rates(stats: dict) -> dict:
    """Add ``hit_rate`` next to every ``hits``/``misses`` pair (nested dicts included)."""
    out = {}
    for k, v in stats.items():
        out[k] = _with_hit_rates(v) if isinstance(v, dict) else v
    if "hits" in out and "misses" in out and "hit_rate" not in out:
        try:
            total = out["hits"] + out["misses"]
            out["hit_rate"] = out["hits"] / total if total else None
        except TypeError:
            pass
    return out
