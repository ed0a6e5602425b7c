"""``ssp-sam prelabel``: pre-label a whole Label Studio project with the model the backend serves, resumably, in one
process or sharded across processes and GPUs with ``torchrun``.

"Retrieve predictions" sends every selected task in one ``/predict`` that Label Studio gives up on after
``ML_TIMEOUT_PREDICT`` (100 s); this command talks to Label Studio itself, through label-studio-sdk, at its own pace:

1. Rank 0 reads the project's labeling config and its tasks (id, data, the model versions of their predictions);
   every rank gets that same list (``torch.distributed`` broadcast over gloo), so every rank plans alike.
2. ``model_version`` is the backend's: the published version in ``MODEL_DIR`` if any, else the configured variant
   (:class:`backend.serving.model_manager.ModelManager`, the same resolution and the same string as ``/setup``).
   Tasks that already hold a prediction of that version are skipped, so a run that was killed resumes where it
   stopped. The others, sorted by id, are dealt out: rank r takes the r-th, (r + world)-th, ... of them, so the ranks
   get equal shares of what is left (however an earlier run left it) and finish together.
3. Each rank predicts its tasks in batches with the backend's own task -> regions code
   (:meth:`backend.serving.model.SSPSAMBackend.prepare` and ``predict_prepared``: the same sentences, labels, mask
   regions, score and ``model_version`` as ``/predict``; the SAM and CLIP image encoders run batched across a batch's
   images). A thread pool downloads and decodes the next tasks while the model works (at most ``2 x batch`` images
   ahead), and one upload thread stores each batch's predictions through the SDK while the model works on the next.
4. Every rank's summary is gathered on rank 0, which prints one JSON object on stdout.

One bad task (no image, a download error, no sentence, a refused prediction) is reported in the summary and never
stops the run; exit status 0 when the run completed. Label Studio unreachable, a refused token, an unknown project or
an unloadable model end the run with a one-line message and exit status 1; a later run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Optional

from backend.config import BackendConfig, ConfigError
from backend.labelstudio.brush import MASK_TYPES
from backend.labelstudio.label_config import LabelConfigError, LabelingSpec, parse_label_config
from backend.labelstudio.media import MediaFetcher
from backend.labelstudio.project import LabelStudioProject, LabelStudioUnavailable, ProjectTask
from backend.logs import loggable
from backend.serving.app import Runtime
from backend.serving.model import ModelUnavailable, SSPSAMBackend, TaskError
from backend.serving.model_manager import ModelManager

logger = logging.getLogger(__name__)

UPLOADS_IN_FLIGHT = 2          # batches handed to the upload thread and not yet confirmed
# how long a rank waits for the others at the end (gather of the summaries): the shares are equal, but a long run's
# ranks can still finish hours apart (a slower GPU, larger images); torch's default of 30 minutes would end the run
RANKS_WAIT = timedelta(days=7)
# seconds of a rank's pipeline: waiting for downloads + decoding, in the model (with the regions' RLE and the
# datastore records), waiting for Label Studio to confirm uploads; the rest is bookkeeping
STAGES = ("media_wait_s", "model_s", "upload_wait_s")


class PrelabelError(RuntimeError):
    """The run cannot go on (the message is one line)."""


# ---------------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    """What one rank did; :meth:`merge` adds the ranks up."""
    project: int
    model_version: str
    tasks: int = 0                 # tasks in the project
    done: int = 0                  # predictions stored by this run
    skipped: int = 0               # tasks that already held a prediction of model_version
    failed: dict = field(default_factory=dict)   # task id -> reason
    regions: int = 0               # mask regions (brush or bitmask) in the stored predictions
    empty: int = 0                 # stored predictions without a region (the model found nothing)
    elapsed_s: float = 0.0         # the whole run: connection, listing, model load, predictions
    pipeline_s: float = 0.0        # downloads, model and uploads only (the first task's download to the last upload)
    stages: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))   # where the pipeline's time went
    ranks: int = 1

    @staticmethod
    def merge(parts: list["Summary"]) -> "Summary":
        first = parts[0]
        failed: dict = {}
        for p in parts:
            failed.update(p.failed)
        # every rank sees the whole project and skips the same tasks: count those once
        return Summary(project=first.project, model_version=first.model_version, tasks=first.tasks,
                       done=sum(p.done for p in parts), skipped=first.skipped, failed=failed,
                       regions=sum(p.regions for p in parts), empty=sum(p.empty for p in parts),
                       elapsed_s=max(p.elapsed_s for p in parts), pipeline_s=max(p.pipeline_s for p in parts),
                       stages={k: max(p.stages.get(k, 0.0) for p in parts) for k in STAGES}, ranks=len(parts))

    def to_json(self) -> dict:
        return {"project": self.project, "model_version": self.model_version, "tasks": self.tasks,
                "done": self.done, "skipped": self.skipped, "failed": len(self.failed),
                "remaining": self.tasks - self.skipped - self.done,
                "failures": [{"task": tid, "reason": self.failed[tid]} for tid in sorted(self.failed)],
                "regions": self.regions, "empty": self.empty, "elapsed_s": round(self.elapsed_s, 2),
                "pipeline_s": round(self.pipeline_s, 2),
                "images_per_s": round(self.done / self.pipeline_s, 3) if self.pipeline_s > 0 else None,
                "stages": {k: round(v, 2) for k, v in self.stages.items()}, "ranks": self.ranks}


# ---------------------------------------------------------------------------------------------------------------------
# planning: which tasks this rank predicts
# ---------------------------------------------------------------------------------------------------------------------

def plan(tasks: list[ProjectTask], version: str, rank: int, world: int,
         limit: Optional[int] = None) -> tuple[list[ProjectTask], int]:
    """(this rank's tasks to predict, by id; the number of tasks skipped because they hold a prediction of
    ``version``). The tasks left, sorted by id, are dealt out in turn: equal shares (within one task) whatever ids an
    earlier run left, so no rank waits long for the others at the end. ``limit`` bounds the tasks predicted by the
    whole run (the lowest ids first)."""
    todo = sorted((t for t in tasks if not t.has_prediction_of(version)), key=lambda t: t.id)
    skipped = len(tasks) - len(todo)
    if limit is not None:
        todo = todo[:max(0, limit)]
    return todo[rank::world], skipped


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline of one rank
# ---------------------------------------------------------------------------------------------------------------------

class Prelabeler:
    """Predicts and uploads one rank's tasks: download + decode ahead in ``workers`` threads, the model on
    ``batch_size`` tasks at a time, uploads in a background thread."""

    def __init__(self, backend: SSPSAMBackend, spec: LabelingSpec, served: Any, project: LabelStudioProject,
                 summary: Summary, batch_size: int = 8, workers: int = 4, progress: Any = None) -> None:
        self.backend, self.spec, self.served, self.project = backend, spec, served, project
        self.summary = summary
        self.batch_size = max(1, int(batch_size))
        self.workers = max(1, int(workers))
        self.progress = progress

    def run(self, tasks: list[ProjectTask]) -> Summary:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="prelabel-media")
        uploader = ThreadPoolExecutor(1, thread_name_prefix="prelabel-upload")
        uploads: deque = deque()
        try:
            ahead: deque = deque()           # (task, future of backend.prepare), in task order
            todo = iter(tasks)
            window = max(2 * self.batch_size, self.workers)

            def refill() -> None:
                while len(ahead) < window:
                    t = next(todo, None)
                    if t is None:
                        return
                    task = {"id": t.id, "data": t.data, "project": self.project.project_id}
                    ahead.append((t.id, pool.submit(self.backend.prepare, self.spec, task, None)))

            refill()
            batch: dict = {}
            while ahead:
                tid, fut = ahead.popleft()
                refill()
                try:
                    with self._stage("media_wait_s"):
                        batch[tid] = fut.result()
                except TaskError as exc:
                    self._fail(tid, str(exc))
                except Exception as exc:     # a bug must cost one task, not the run
                    logger.exception("task %s: preparing it failed", tid)
                    self._fail(tid, f"preparing the task failed: {type(exc).__name__}")
                if len(batch) >= self.batch_size or (batch and not ahead):
                    self._predict(batch, uploader, uploads)
                    batch = {}
            while uploads:
                self._collect(uploads.popleft())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            uploader.shutdown(wait=False, cancel_futures=True)
        return self.summary

    def _predict(self, batch: dict, uploader: ThreadPoolExecutor, uploads: deque) -> None:
        predictions = []
        with self._stage("model_s"):
            outcomes = self.backend.predict_prepared(self.spec, self.served, batch)
        for tid, (pred, _msg) in outcomes.items():
            if "error" in pred:
                self._fail(tid, pred["error"])
            else:
                predictions.append({"task": tid, "result": pred["result"], "score": pred["score"],
                                    "model_version": pred["model_version"]})
        if not predictions:
            return
        while len(uploads) >= UPLOADS_IN_FLIGHT:
            self._collect(uploads.popleft())
        uploads.append((predictions, uploader.submit(self.project.upload, predictions)))

    def _collect(self, item: tuple[list, Future]) -> None:
        predictions, fut = item
        with self._stage("upload_wait_s"):
            outcome = fut.result()           # LabelStudioUnavailable ends the run
        for p in predictions:
            reason = outcome.get(p["task"], "Label Studio did not confirm the prediction")
            if reason is not None:
                self._fail(p["task"], reason)
                continue
            regions = sum(1 for r in p["result"] if r.get("type") in MASK_TYPES)
            self.summary.done += 1
            self.summary.regions += regions
            self.summary.empty += regions == 0
            self._tick()

    @contextmanager
    def _stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.summary.stages[name] += time.perf_counter() - t

    def _fail(self, tid: int, reason: str) -> None:
        logger.warning("task %s not pre-labeled: %s", tid, loggable(reason, None))
        self.summary.failed[tid] = reason
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


class PrelabelRuntime(Runtime):
    """The server's :class:`backend.serving.app.Runtime`, with its datastore records (``record_prediction``: the mask
    blob and a row, each one commit, about 10 ms on SQLite) written by a background thread, so that in a bulk run they
    overlap the model instead of holding its thread. At most ``pending`` records wait (each holds a mask); they are
    best effort, as in the server. ``flush()`` waits for them."""

    def __init__(self, *args, pending: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._recorder = ThreadPoolExecutor(1, thread_name_prefix="prelabel-records")
        self._slots = threading.BoundedSemaphore(pending)

    def record_prediction(self, *args) -> None:
        self._slots.acquire()
        try:
            self._recorder.submit(self._record, *args)
        except RuntimeError:                   # flushed already: write it here
            self._record(*args)

    def _record(self, *args) -> None:
        try:
            Runtime.record_prediction(self, *args)
        finally:
            self._slots.release()

    def flush(self) -> None:
        self._recorder.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------------------------------
# one run: connection, model, ranks
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Options:
    project: int
    batch_size: int = 8
    workers: int = 4
    limit: Optional[int] = None
    progress: bool = True


def _distributed() -> tuple[int, int, bool]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1, over gloo (only small Python objects travel between
    ranks, whatever device the model runs on). Returns (rank, world, whether this call created the group)."""
    import torch
    import torch.distributed as dist

    from ssp_sam.distributed import init_distributed

    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    rank, world, _ = init_distributed(torch.device("cpu"), timeout=RANKS_WAIT)
    return rank, world, created


def _rank_device(config: BackendConfig, rank: int, world: int) -> BackendConfig:
    """Under torchrun with CUDA, each rank on the GPU of its ``LOCAL_RANK`` (unless ``DEVICE`` names one)."""
    if world <= 1 or config.device not in ("auto", "cuda"):
        return config
    import torch

    if not torch.cuda.is_available():
        return config
    index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return replace(config, device=f"cuda:{index}")


def run(options: Options, config: Optional[BackendConfig] = None, *, client_factory: Optional[Callable] = None,
        predictor_factory: Optional[Callable] = None, store_factory: Optional[Callable] = None) -> Optional[Summary]:
    """Pre-label ``options.project``; the merged summary on rank 0 (None on the other ranks). Raises
    :class:`PrelabelError` with a one-line message when the run cannot go on. The factories replace the SDK client,
    the model and the datastore in tests."""
    from ssp_sam.distributed import broadcast_object, gather_objects

    t0 = time.perf_counter()
    config = config or BackendConfig.from_env()
    rank, world, created = _distributed()
    try:
        config = replace(_rank_device(config, rank, world), predict_batch_size=max(1, options.batch_size))
        media = MediaFetcher(config)             # the backend's token rules; no /setup connection here
        project = LabelStudioProject(media, options.project, client_factory=client_factory)
        listing = None
        if rank == 0:
            label_config = project.label_config()
            listing = (label_config, project.tasks())
        label_config, tasks = broadcast_object(listing)
        try:
            spec = parse_label_config(label_config)
        except LabelConfigError as exc:
            raise PrelabelError(f"project {options.project}'s labeling config cannot be used: {exc}") from None

        manager = ModelManager(config, predictor_factory=predictor_factory)
        try:
            version = manager.version
        except Exception as exc:
            raise PrelabelError(f"the configured model is unavailable: {exc}") from None
        versions = set(gather_objects(version))
        if len(versions) > 1:
            raise PrelabelError(f"the ranks resolved different model versions {sorted(versions)}: a version was "
                                f"published in MODEL_DIR while the run started; run it again")
        mine, skipped = plan(tasks, version, rank, world, options.limit)
        summary = Summary(project=options.project, model_version=version, tasks=len(tasks), skipped=skipped,
                          ranks=world)
        logger.info("rank %d/%d: %d task(s) in project %d, %d already predicted by %s, %d to predict here",
                    rank, world, len(tasks), options.project, skipped, version, len(mine))
        if mine:
            runtime = PrelabelRuntime(config, manager, media, store_factory=store_factory, start_worker=False)
            backend = SSPSAMBackend(runtime, project_id=options.project, label_config=label_config)
            served = backend.served()
            if served.version != version:
                raise PrelabelError(f"MODEL_DIR now publishes {served.version}, not {version}: run it again")
            progress = _progress_bar(len(mine), rank, world, options.progress)
            t_pipeline = time.perf_counter()
            try:
                Prelabeler(backend, spec, served, project, summary, batch_size=options.batch_size,
                           workers=options.workers, progress=progress).run(mine)
            finally:
                runtime.flush()
                summary.pipeline_s = time.perf_counter() - t_pipeline
                if progress is not None:
                    progress.close()
        summary.elapsed_s = time.perf_counter() - t0
        parts = gather_objects(summary)
        return Summary.merge(parts) if rank == 0 else None
    except LabelStudioUnavailable as exc:
        raise PrelabelError(str(exc)) from None
    except ModelUnavailable as exc:
        raise PrelabelError(str(exc)) from None
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _progress_bar(total: int, rank: int, world: int, enabled: bool):
    """tqdm on stderr (images/s and ETA), on rank 0 only: its shard is as large as the others' within one task."""
    if not enabled or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="prelabel" if world == 1 else f"prelabel rank 0/{world}",
                file=sys.stderr, mininterval=1.0, smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def _cmd_prelabel(args: argparse.Namespace) -> int:
    try:
        config = BackendConfig.from_env()
        summary = run(Options(project=args.project, batch_size=args.batch_size or config.predict_batch_size,
                              workers=args.workers, limit=args.limit, progress=not args.no_progress), config)
    except (PrelabelError, ConfigError) as exc:
        print(f"ssp-sam prelabel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ssp-sam prelabel: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if summary is not None:
        print(json.dumps(summary.to_json()), flush=True)
    return 0


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register_cli(sub) -> None:
    p = sub.add_parser("prelabel", help="pre-label a whole Label Studio project (resumable; torchrun shards it)",
                       description="Pre-label every task of a Label Studio project with the model the backend "
                                   "serves (same regions and model_version as /predict); tasks that already hold a "
                                   "prediction of that version are skipped, so a killed run resumes. Under torchrun "
                                   "the tasks left are dealt out to the processes in id order. Prints a JSON "
                                   "summary on stdout.")
    p.add_argument("--project", type=_positive, required=True, help="Label Studio project id")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="tasks per model call (default PREDICT_BATCH_SIZE, 8)")
    p.add_argument("--workers", type=_positive, default=4, help="download/decode threads per process (default 4)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="predict at most this many tasks in this run (the lowest ids not yet predicted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_prelabel)
