"""The first run: the whole loop on this machine (docs/first-run.md).

Starts Label Studio 1.23.2 (headless, ``scripts/labelstudio_headless.py``), the backend (``ssp-sam serve``, the demo
model) and the trainer (``ssp-sam finetune --watch`` with small thresholds), creates a project of synthetic scenes
with their sentences, connects the backend (interactive pre-annotations, the webhook) and retrieves predictions for
every task. Then it waits, reporting corrections, training rounds and the model version Label Studio sees, until
Ctrl-C (or ``scripts/demo.sh stop``) stops everything it started.

    scripts/demo.sh            # interactive; prints the URL, the login and what to do
    scripts/demo.sh --check    # non-interactive: also corrects a few tasks through the API, waits for a published
                               # version that Label Studio reports, stops everything, exits 0 (CI)
    scripts/demo.sh stop       # stop a demo running in another terminal

Environment: DEMO_DIR (default ./demo_data), DEMO_LS_PORT (8080), DEMO_BACKEND_PORT (9090), DEMO_TASKS (30; 6 with
--check), DEMO_PASSWORD, LS_VENV (default ./.venv-ls).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests
from label_studio_sdk.core.api_error import ApiError

from scripts.labelstudio_headless import (LS_VENV, ROOT, Login, StartError, free_port, port_is_free,
                                          start_label_studio, start_process, stop, tail, wait_http)

PROJECT_TITLE = "SSP-SAM demo"
EMAIL = "demo@example.com"
DEFAULT_PASSWORD = "ssp-sam-demo"
MARKER = "SSP_SAM_DEMO_DIR"          # set in every process the demo starts: `stop` finds them by it
SCENE_SEED = 2024
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="1" placeholder="describe the object"
            showSubmitButton="true" maxSubmissions="1"/>
  <BrushLabels name="tag" toName="image"><Label value="object" background="#FF00FF"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="object" background="#00C0FF"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object" background="#00C0FF"/></RectangleLabels>
</View>"""
# The trainer (`ssp-sam finetune --watch`), sized so that a handful of corrections makes a round (the defaults wait
# for 50): a round starts once 4 new corrections wait (--every-samples), or 3 minutes after the first one. A task is
# held out (never trained on, used to judge the new version) by a hash of its id, here a third of them; a round
# needs 2 training and 1 held-out corrections (--min-train, --min-heldout), else it is skipped until more arrive.
# 3 epochs over so few samples take seconds on a CPU. With one or two held-out masks a single task moves held-out
# mIoU by several points, so the demo publishes unless it drops by more than 5 points (--tolerance 0.05; the
# default 0 means "not worse", for real held-out sets).
TRAINER_ARGS = ["--every-samples", "4", "--every-minutes", "3", "--poll-s", "2", "--heldout", "0.34",
                "--min-train", "2", "--min-heldout", "1", "--epochs", "3", "--tolerance", "0.05"]
# --check: one tiny round (a few optimiser steps) that always publishes (--tolerance 1): it proves the wiring, not
# that the model got better (tests/learning cover the publish-only-if-better rule).
CHECK_TRAINER_ARGS = ["--every-samples", "3", "--every-minutes", "60", "--poll-s", "0.5", "--heldout", "0.34",
                      "--min-train", "2", "--min-heldout", "1", "--epochs", "1", "--max-steps", "2",
                      "--patch-head-fit-steps", "5", "--curve-every", "0", "--tolerance", "1.0"]
# what the user's environment may hold for a backend elsewhere; the demo's processes must not inherit it
FOREIGN_ENV = ("LABEL_STUDIO_", "SSP_SAM_", "DJANGO", "MODEL_DIR", "DATASTORE_URL", "SAM_CHECKPOINT", "CLIP_CHECKPOINT",
               "BASIC_AUTH_", "WEBHOOK_SECRET", "HOST", "PORT", "WORKERS", "THREADS", "PRELOAD_MODEL",
               "MEDIA_ALLOW_PRIVATE_NETWORKS", "PROMPT_FIELDS")


class DemoError(RuntimeError):
    """Something the demo needs did not happen; the message says what and where to look."""


@dataclass
class Settings:
    check: bool
    demo_dir: Path
    ls_port: int
    backend_port: int
    n_tasks: int
    password: str

    @property
    def work(self) -> Path:
        """Where this run keeps Label Studio's data, the model dir and the logs."""
        return self.demo_dir / "check" if self.check else self.demo_dir

    @property
    def ls_url(self) -> str:
        return f"http://127.0.0.1:{self.ls_port}"

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    @property
    def model_dir(self) -> Path:
        return self.work / "model_dir"

    @property
    def state_file(self) -> Path:
        return self.work / "demo.pid"


@dataclass
class Running:
    """The processes this run started, stopped in reverse order."""

    procs: dict = field(default_factory=dict)

    def add(self, name: str, proc) -> None:
        self.procs[name] = proc

    def check_alive(self, logs: dict) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DemoError(f"{name} exited with {proc.returncode}; log {logs[name]}:\n{tail(logs[name], 40)}")

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop(proc, grace_s=10)


# ---------------------------------------------------------------------------------------------------------------------
# settings, login, state
# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=("start", "stop"), default="start")
    ap.add_argument("--check", action="store_true",
                    help="non-interactive run of the whole loop (CI); exit 0 if it worked")
    ap.add_argument("--fresh", action="store_true", help="delete the demo's data (Label Studio, corrections, versions) "
                                                         "before starting")
    return ap.parse_args(argv)


def int_env(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise DemoError(f"{name}={value!r} is not a number") from None


def settings_from_env(check: bool) -> Settings:
    demo_dir = Path(os.environ.get("DEMO_DIR") or ROOT / "demo_data").resolve()
    # --check picks free ports unless told (0 = a free one)
    ls_port = int_env("DEMO_LS_PORT", 0 if check else 8080) or free_port()
    backend_port = int_env("DEMO_BACKEND_PORT", 0 if check else 9090) or free_port()
    n_tasks = int_env("DEMO_TASKS", 6 if check else 30)
    if n_tasks < 1:
        raise DemoError("DEMO_TASKS must be at least 1")
    return Settings(check, demo_dir, ls_port, backend_port, n_tasks,
                    os.environ.get("DEMO_PASSWORD") or DEFAULT_PASSWORD)


def demo_login(st: Settings) -> Login:
    """The Label Studio user of this demo folder. Its legacy token is made at the first start and kept in
    ``login.json`` (Label Studio applies it only when it creates the user)."""
    path = st.work / "login.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return Login(saved["email"], saved["password"], saved["token"])
    if (st.work / "ls-data" / "label_studio.sqlite3").exists():
        raise DemoError(f"{st.work}/ls-data holds a Label Studio database but {path} is gone: "
                        f"start again with --fresh")
    login = Login(EMAIL, st.password, secrets.token_hex(20))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(login.__dict__))
    path.chmod(0o600)
    return login


def write_state(st: Settings) -> None:
    st.state_file.parent.mkdir(parents=True, exist_ok=True)
    st.state_file.write_text(json.dumps({"pid": os.getpid(), "work": str(st.work)}))


def read_state(st: Settings) -> dict | None:
    try:
        return json.loads(st.state_file.read_text())
    except (OSError, ValueError):
        return None


def is_demo_controller(pid: int) -> bool:
    """Whether ``pid`` is alive and runs this script (not an unrelated process that got the id later)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"scripts.demo" in cmdline or any(c.endswith(b"scripts/demo.py") for c in cmdline)


def marked_processes(demo_dir: Path) -> list[int]:
    """Ids of the processes whose environment carries this demo folder's marker (all the demo started)."""
    marker = f"{MARKER}={demo_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_marked(demo_dir: Path, grace_s: float = 10) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``, every process carrying the marker; how many there were."""
    pids = marked_processes(demo_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_until(lambda: not marked_processes(demo_dir), grace_s if sig == signal.SIGTERM else 5):
            break
    return len(pids)


def stop_running_demo(st: Settings) -> int:
    """``scripts/demo.sh stop``: ask the demo's controller to stop, then end whatever it left (it may have been
    killed without a chance to clean up)."""
    state = read_state(st)
    if state and is_demo_controller(state["pid"]):
        print(f"stopping the demo (pid {state['pid']}) ...")
        os.kill(state["pid"], signal.SIGTERM)
        if not wait_until(lambda: not is_demo_controller(state["pid"]), 60):
            os.kill(state["pid"], signal.SIGKILL)
    left = kill_marked(st.work)
    if left:
        print(f"ended {left} leftover process(es) of the demo")
    st.state_file.unlink(missing_ok=True)
    print("the demo is stopped" if state or left else "no demo was running")
    return 0


def refuse_a_second_demo(st: Settings) -> None:
    state = read_state(st)
    if state and is_demo_controller(state["pid"]):
        raise DemoError(f"a demo is already running (pid {state['pid']}); stop it with: scripts/demo.sh stop")
    if kill_marked(st.work):
        print("ended the leftovers of a demo that was killed")
    for name, port, var in (("Label Studio", st.ls_port, "DEMO_LS_PORT"),
                            ("the backend", st.backend_port, "DEMO_BACKEND_PORT")):
        if not port_is_free(port):
            raise DemoError(f"port {port} for {name} is in use (another Label Studio or backend?): stop that, or "
                            f"choose another port with {var}=...")


# ---------------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------------

def child_env(st: Settings, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", MARKER: str(st.work), **extra})
    return env


def backend_env(st: Settings, login: Login) -> dict:
    """The backend and the trainer share these (same MODEL_DIR, so the same datastore and versions)."""
    return child_env(st, MODEL_DIR=str(st.model_dir), SSP_SAM_VARIANT="demo", LABEL_STUDIO_URL=st.ls_url,
                     LABEL_STUDIO_API_KEY=login.token, LOG_LEVEL="INFO")


def start_all(st: Settings, login: Login, running: Running) -> dict:
    """Label Studio, the backend and the trainer, started together and waited for; their log paths."""
    st.work.mkdir(parents=True, exist_ok=True)
    ls = start_label_studio(st.work, login, port=st.ls_port, venv=LS_VENV)
    running.add("label-studio", ls.proc)
    logs = {"label-studio": ls.log, "backend": st.work / "backend.log", "trainer": st.work / "trainer.log"}
    serve = [sys.executable, "-m", "backend.cli", "serve"]
    env = backend_env(st, login)
    running.add("backend", start_process(serve, {**env, "HOST": "127.0.0.1", "PORT": str(st.backend_port),
                                                 "WORKERS": "1", "THREADS": "8", "PRELOAD_MODEL": "true"},
                                         ROOT, logs["backend"]))
    trainer = [sys.executable, "-m", "backend.cli", "finetune", "--watch", "--model-dir", str(st.model_dir),
               *(CHECK_TRAINER_ARGS if st.check else TRAINER_ARGS)]
    running.add("trainer", start_process(trainer, env, ROOT, logs["trainer"]))
    say(f"starting Label Studio on {st.ls_url}, the backend on {st.backend_url} and the trainer "
        f"(logs in {st.work})")
    try:
        wait_http(st.backend_url + "/health", running.procs["backend"], 180, logs["backend"])
        wait_http(st.ls_url + "/health", ls.proc, 300, ls.log)
    except StartError as exc:
        raise DemoError(str(exc)) from None
    running.check_alive(logs)
    return logs


# ---------------------------------------------------------------------------------------------------------------------
# the project
# ---------------------------------------------------------------------------------------------------------------------

def sdk_client(st: Settings, login: Login):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=st.ls_url, api_key=login.token, timeout=300)


def demo_scenes(n: int) -> list:
    """``n`` synthetic scenes whose sentence names something in the picture (covering > 1 % of it)."""
    from ssp_sam.data.synthetic import generate_sample

    scenes, index = [], 0
    while len(scenes) < n:
        sample = generate_sample(SCENE_SEED, index)
        index += 1
        if sample.mask.any() and sample.mask.mean() > 0.01:
            scenes.append(sample)
    return scenes


def png_bytes(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def upload_images(st: Settings, login: Login, client, project_id: int, scenes: list) -> list[str]:
    """Upload the scene images to Label Studio without making tasks; their ``/data/upload/...`` URLs, in order.
    (The SDK has no call for this upload; it is the Data Manager's import endpoint.)"""
    files = [(f"file{i}", (f"scene{i:03d}.png", png_bytes(s.image), "image/png")) for i, s in enumerate(scenes)]
    r = requests.post(f"{st.ls_url}/api/projects/{project_id}/import", params={"commit_to_project": "false"},
                      files=files, headers={"Authorization": f"Token {login.token}"}, timeout=120)
    if r.status_code != 201:
        raise DemoError(f"uploading {len(files)} images to Label Studio failed: HTTP {r.status_code} {r.text[:300]}")
    by_name = {}
    for upload_id in r.json()["file_upload_ids"]:
        path = client.files.get(upload_id).file                     # upload/<project>/<prefix>-sceneNNN.png
        by_name[path.rsplit("-", 1)[-1]] = f"/data/{path}"
    return [by_name[f"scene{i:03d}.png"] for i in range(len(scenes))]


def find_or_create_project(client) -> int:
    """The demo project, made once per demo folder. "Use predictions to pre-label" is on: the editor opens a task
    with the model's mask as the draft annotation."""
    for project in client.projects.list():
        if project.title == PROJECT_TITLE:
            return project.id
    project = client.projects.create(title=PROJECT_TITLE, label_config=LABEL_CONFIG,
                                     description="Synthetic scenes; each task's sentence names one object or a few.",
                                     show_collab_predictions=True)
    return project.id


def import_tasks(st: Settings, login: Login, client, project_id: int) -> list[int]:
    scenes = demo_scenes(st.n_tasks)
    urls = upload_images(st, login, client, project_id, scenes)
    tasks = [{"image": url, "text": s.sentence, "scene": s.meta["index"]} for url, s in zip(urls, scenes)]
    client.projects.import_tasks(project_id, request=tasks)
    ids = task_ids(client, project_id)
    if len(ids) != len(tasks):
        raise DemoError(f"imported {len(tasks)} tasks but Label Studio lists {len(ids)}")
    return ids


def task_ids(client, project_id: int) -> list[int]:
    return sorted(t.id for t in client.tasks.list(project=project_id, page_size=1000))


def connect_backend(st: Settings, client, project_id: int) -> int:
    """The ML backend record (interactive pre-annotations on) and the webhook to ``/webhook`` that brings every
    annotation event to the backend. LS adds that webhook itself when it creates the record; it is added here if not.
    The record and webhook of an earlier run on other ports are replaced (LS 1.23.2 answers 500 to a change of a
    record's URL). Returns the ML backend id."""
    ml = None
    for old in client.ml.list(project=project_id):
        if old.url.rstrip("/") == st.backend_url and ml is None:
            ml = old
        else:
            client.ml.delete(old.id)
    if ml is None:
        ml = client.ml.create(project=project_id, url=st.backend_url, title="SSP-SAM (demo model)",
                              is_interactive=True)
    if ml.state != "CO":
        raise DemoError(f"Label Studio could not connect to the backend at {st.backend_url} (state {ml.state}: "
                        f"{ml.error_message}); see {st.work / 'backend.log'}")
    hooks = client.webhooks.list(project=project_id)
    for stale in (h for h in hooks if h.url.endswith("/webhook") and h.url.rstrip("/") != st.backend_url + "/webhook"):
        client.webhooks.delete(stale.id)
    if not any(h.url.rstrip("/") == st.backend_url + "/webhook" for h in hooks):
        client.webhooks.create(project=project_id, url=st.backend_url + "/webhook", send_payload=True,
                               send_for_all_actions=True, is_active=True)
    return ml.id


def retrieve_predictions(client, project_id: int, ids: list[int], batch: int = 10) -> None:
    """The Data Manager's "Retrieve predictions", in batches (LS waits at most 100 s for one /predict call)."""
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                              selected_items={"all": False, "included": chunk})
        say(f"  predictions retrieved for {start + len(chunk)}/{len(ids)} tasks")


def predictions_by_task(client, ids: list[int]) -> dict[int, list]:
    return {tid: list(client.predictions.list(task=tid)) for tid in ids}


def check_predictions(client, ids: list[int], version: str) -> dict[int, list]:
    """Every task holds a prediction of the served version (an empty result is the model's "nothing matches")."""
    preds = predictions_by_task(client, ids)
    missing = [tid for tid, ps in preds.items() if not any(p.model_version == version for p in ps)]
    if missing:
        raise DemoError(f"{len(missing)} of {len(ids)} tasks have no prediction of model version {version}: "
                        f"tasks {missing[:10]}")
    return preds


def served_version(st: Settings) -> str:
    return requests.get(st.backend_url + "/health", timeout=10).json().get("model_version")


def set_up_project(st: Settings, login: Login) -> dict:
    """Project, tasks, model connection, predictions; what the rest needs."""
    client = sdk_client(st, login)
    project_id = find_or_create_project(client)
    ids = task_ids(client, project_id)
    if not ids:
        say(f"importing {st.n_tasks} synthetic scenes into project {project_id} ...")
        ids = import_tasks(st, login, client, project_id)
    ml_id = connect_backend(st, client, project_id)
    version = served_version(st)
    say(f"retrieving predictions of model version {version} (about a second a task on a CPU) ...")
    retrieve_predictions(client, project_id, ids)
    preds = check_predictions(client, ids, version)
    with_mask = sum(any(r.get("type") == "brushlabels" for p in ps for r in (p.result or [])) for ps in preds.values())
    say(f"{len(ids)} tasks pre-annotated; the model drew a mask on {with_mask} (an empty prediction is its "
        f"\"nothing matches\")")
    return {"client": client, "project": project_id, "tasks": ids, "ml": ml_id, "version": version, "preds": preds}


# ---------------------------------------------------------------------------------------------------------------------
# --check: corrections through the API, a published version, Label Studio reporting it
# ---------------------------------------------------------------------------------------------------------------------

def pick_corrections(project_id: int, ids: list[int], n_train: int = 2, n_heldout: int = 1) -> list[int]:
    """Tasks to correct so that the trainer's split has what a round needs (its held-out rule, ``is_heldout``)."""
    from backend.learning.finetune import is_heldout

    fraction = float(CHECK_TRAINER_ARGS[CHECK_TRAINER_ARGS.index("--heldout") + 1])
    held = [t for t in ids if is_heldout(t, fraction, project_id)][:n_heldout]
    train = [t for t in ids if t not in held][:n_train]
    if len(held) < n_heldout or len(train) < n_train:
        raise DemoError(f"{len(ids)} tasks give {len(held)} held-out and {len(train)} training tasks; "
                        f"raise DEMO_TASKS")
    return train + held


def correction_result(task_data: dict) -> list[dict]:
    """What an annotator submits after fixing the pre-annotation: the scene's true mask and its sentence."""
    from ssp_sam.data.masks import mask_to_brush_rle
    from ssp_sam.data.synthetic import generate_sample

    scene = generate_sample(SCENE_SEED, task_data["scene"])
    mask = scene.mask.astype("uint8") * 255
    h, w = mask.shape
    return [{"id": "fix", "from_name": "tag", "to_name": "image", "type": "brushlabels", "origin": "prediction-changed",
             "original_width": w, "original_height": h, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["object"]}},
            {"id": "fix", "from_name": "prompt", "to_name": "image", "type": "textarea", "origin": "prediction",
             "value": {"text": [task_data["text"]]}}]


def submit_corrections(project: dict) -> list[int]:
    client = project["client"]
    chosen = pick_corrections(project["project"], project["tasks"])
    for tid in chosen:
        task = client.tasks.get(tid)
        parent = project["preds"][tid][0].id
        client.annotations.create(tid, result=correction_result(task.data), was_cancelled=False, ground_truth=False,
                                  lead_time=4.0, parent_prediction=parent)
    say(f"submitted corrections for tasks {chosen} (as an annotator would, through the API)")
    return chosen


def wait_for_samples(st: Settings, n: int, logs: dict, timeout: float = 60) -> None:
    """The webhook brought the corrections to the backend, whose worker turned them into training samples."""
    def count() -> int:
        store = open_store(st)
        if store is None:
            return 0
        try:
            return len(store.list_samples(active=True))
        finally:
            store.close()

    if not wait_until(lambda: count() >= n, timeout):
        raise DemoError(f"{count()} of {n} corrections reached the backend's datastore within {timeout:.0f} s (the "
                        f"project webhook to /webhook delivers them); log {logs['backend']}:\n"
                        f"{tail(logs['backend'], 30)}")
    say(f"the backend queued the {n} corrections as training samples")


def wait_until(predicate: Callable[[], object], timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def published_version(st: Settings) -> str | None:
    try:
        return json.loads((st.model_dir / "versions" / "current.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def last_round(st: Settings) -> str:
    """The latest training round's decision and reason, for failure messages."""
    reports = sorted((st.model_dir / "runs").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return "no training round has run"
    rep = json.loads(reports[-1].read_text())
    return f"last round {rep.get('run_id')}: {rep.get('decision')} - {rep.get('reason')}"


def run_check(st: Settings, project: dict, running: Running, logs: dict) -> None:
    """Corrections -> the backend queues them -> the trainer publishes -> the backend serves it -> Label Studio
    reports it; bounded waits, each failure naming the step and the log to read."""
    t0 = time.monotonic()
    chosen = submit_corrections(project)
    wait_for_samples(st, len(chosen), logs)

    def published():
        running.check_alive(logs)
        return published_version(st)

    new = wait_until(published, 240)
    if not new:
        raise DemoError(f"the trainer published no version within 240 s ({last_round(st)}); log {logs['trainer']}:\n"
                        f"{tail(logs['trainer'], 30)}")
    say(f"the trainer published {new} ({last_round(st)}), {time.monotonic() - t0:.0f} s after the corrections")
    if not wait_until(lambda: served_version(st) == new, 120):
        raise DemoError(f"the backend still serves {served_version(st)}, not {new}, after 120 s; log "
                        f"{logs['backend']}:\n{tail(logs['backend'], 30)}")
    client = project["client"]
    if not wait_until(lambda: client.ml.get(project["ml"]).model_version == new, 60, every=2):
        raise DemoError(f"Label Studio reports model version {client.ml.get(project['ml']).model_version}, not {new}")
    say(f"the backend serves {new} and Label Studio reports it: the loop works")


# ---------------------------------------------------------------------------------------------------------------------
# interactive: what to do, and what happens
# ---------------------------------------------------------------------------------------------------------------------

def print_next_steps(st: Settings, login: Login, project: dict) -> None:
    first = project["tasks"][0]
    say(f"""
  Label Studio  {st.ls_url}/projects/{project['project']}/data      (login {login.email} / {login.password})
  First task    {st.ls_url}/projects/{project['project']}/data?task={first}
  Backend       {st.backend_url}   trainer log {st.work / 'trainer.log'}

  1. Open the project and click a task: the sentence is in the text box and the model's mask is drawn on the image
     in magenta (a task without a mask is the model saying "nothing matches").
  2. Correct a few: paint or erase with the brush (label "object"); or turn Auto-Annotation on, delete the sentence
     (trash icon on the text box), type another and press Enter to ask the model for its mask; then fix that mask
     with clicks (the "click" key-point tool: click to add a part, Alt-click to remove one) or a "box". Submit each.
  3. After {TRAINER_ARGS[1]} corrections the trainer runs a round (a third of the tasks are held out to judge it) and
     publishes a new version if it is not worse; the backend reloads it and Label Studio reports it (this terminal
     says so). For its masks: Data Manager, select the tasks, tasks menu > Retrieve Predictions.

  Ctrl-C here (or scripts/demo.sh stop) stops Label Studio, the backend and the trainer.""")


def watch_the_loop(st: Settings, project: dict, running: Running, logs: dict) -> None:
    """Report corrections, training rounds and the version Label Studio sees, until interrupted."""
    seen = {"samples": None, "runs": None, "ls_version": project["version"]}
    store = None
    try:
        while True:
            running.check_alive(logs)
            store = store or open_store(st)
            if store is not None:
                report_learning(store, seen)
            report_ls_version(project, seen)
            time.sleep(3)
    finally:
        if store is not None:
            store.close()


def report_learning(store, seen: dict) -> None:
    """New corrections (samples in the datastore) and finished training rounds."""
    samples = len(store.list_samples(active=True))
    if samples != seen["samples"]:
        if seen["samples"] is not None:
            say(f"corrections: {samples} samples, {store.count_new_samples()} new since the last round "
                f"(a round starts at {TRAINER_ARGS[1]})")
        seen["samples"] = samples
    finished = [run for run in store.list_runs() if run["finished_at"]]
    if seen["runs"] is None:                      # rounds of an earlier run of the demo: not news
        seen["runs"] = {run["run_id"] for run in finished}
    for run in finished:
        if run["run_id"] not in seen["runs"]:
            seen["runs"].add(run["run_id"])
            outcome = f"published {run['version']}" if run.get("published") else run["status"]
            say(f"trainer round {run['run_id']}: {outcome} - {run.get('reason')}")


def report_ls_version(project: dict, seen: dict) -> None:
    try:
        version = project["client"].ml.get(project["ml"]).model_version
    except Exception:          # noqa: BLE001  (Label Studio busy: try again on the next tick)
        return
    if version != seen["ls_version"]:
        seen["ls_version"] = version
        say(f"Label Studio now reports model version {version}: Retrieve Predictions (Data Manager, tasks menu) "
            f"gets its masks")


def open_store(st: Settings):
    """The corrections datastore the backend and the trainer share (read only here), once the backend made it."""
    db = st.model_dir / "corrections.db"
    if not db.exists():
        return None
    from backend.learning.datastore import open_datastore

    try:
        return open_datastore(str(db), model_dir=st.model_dir, migrate=False)
    except Exception:          # noqa: BLE001  (not migrated yet: next tick)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"[demo] {message}" if not message.startswith("\n") else message, flush=True)


INTERRUPTED = []                 # the signal that ended the demo, once one did


def raise_on_termination() -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the demo through the cleanup (SIGINT too when the shell that started it in the
    background set it to be ignored)."""
    def handler(signum, _frame):
        shield_cleanup()        # the first signal starts the cleanup; more Ctrl-Cs must not break into it
        INTERRUPTED.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def shield_cleanup() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def prepare(st: Settings, fresh: bool) -> Login:
    refuse_a_second_demo(st)
    if (fresh or st.check) and st.work.exists():
        shutil.rmtree(st.work)
    if not (LS_VENV / "bin" / "label-studio").exists():     # scripts/demo.sh installs it first
        raise DemoError(f"no Label Studio in {LS_VENV}: run scripts/ensure_label_studio.sh (or scripts/demo.sh)")
    return demo_login(st)


def run(st: Settings, fresh: bool) -> int:
    login = prepare(st, fresh)
    write_state(st)
    os.environ[MARKER] = str(st.work)      # inherited by every process started from here on
    running = Running()
    raise_on_termination()
    t0 = time.monotonic()
    try:
        logs = start_all(st, login, running)
        project = set_up_project(st, login)
        if st.check:
            run_check(st, project, running, logs)
            say(f"--check passed in {time.monotonic() - t0:.0f} s")
            return 0
        print_next_steps(st, login, project)
        watch_the_loop(st, project, running, logs)
    except KeyboardInterrupt:
        return 0 if not st.check else 130
    except DemoError as exc:
        print(f"[demo] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except ApiError as exc:
        print(f"[demo] FAILED: Label Studio answered HTTP {exc.status_code}: {str(exc.body)[:500]}", file=sys.stderr,
              flush=True)
        return 1
    except requests.RequestException as exc:
        print(f"[demo] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shield_cleanup()
        say("stopping Label Studio, the backend and the trainer ...")
        running.stop_all()
        kill_marked(st.work)
        st.state_file.unlink(missing_ok=True)
        say("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        st = settings_from_env(args.check)
        if args.command == "stop":
            return stop_running_demo(st)
        return run(st, args.fresh)
    except KeyboardInterrupt:   # before the handler is set, or while run() had already left its own try
        return 0 if not args.check else 130
    except DemoError as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        return 1


def exit_now(code: int) -> None:
    """End the process with ``code`` once the cleanup is done. After a handled Ctrl-C, CPython sometimes still ends
    itself by SIGINT on its way out (exit status -2 instead of the demo's 0, seen in CI right after "[demo] stopped"
    was printed: the interpreter kills itself so when it has recorded a KeyboardInterrupt as unhandled, and which
    library's code let one through could not be traced). Everything is stopped and the state file removed by then,
    so after an interrupt the controller exits directly, its output flushed."""
    if INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main())
