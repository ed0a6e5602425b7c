#!/usr/bin/env python
"""Screenshot a pre-annotation in the Label Studio editor (docs/img/prelabel.png), with headless Chromium.

Runs against the demo (``scripts/demo.sh`` running in another terminal): logs in as the demo user like a person
would, opens a task in the Data Manager's editor, where the prediction is loaded as the draft annotation (the demo
project pre-labels with predictions), waits until the outliner lists the brush region and the mask is drawn in the
label's colour, and saves a 1280x800 PNG (palette-compressed). It refuses to save a page that shows no mask.

    apt-get install -y chromium chromium-driver     # Debian's Chromium and its matching chromedriver
    pip install -r requirements-dev.txt             # selenium
    scripts/demo.sh                                 # in another terminal; wait for its "what to do" message
    python scripts/screenshot.py --task 27          # the committed picture: task 27 of a fresh demo

Options: ``--url`` (default http://127.0.0.1:$DEMO_LS_PORT, 8080), ``--task`` (default: the task whose prediction
with a mask scored highest), ``--out``, ``--size``; the login is read from the demo's ``login.json`` (DEMO_DIR).

``--interactive`` (docs/img/interactive.png): a sentence, then one Alt-click. For the demo's tasks in order, it sends
the task's sentence, then the simulated annotator's next click (``ssp_sam.clicks.next_click`` against the scene's
true mask), through Label Studio's own interactive endpoint as the editor does (the click call alone: the backend
keeps the sentence); on the first task where that click is negative and raises the IoU, it imports a copy of the task
whose one prediction is that answer plus the click, and photographs it.
Selenium drives ``/usr/bin/chromium`` through ``/usr/bin/chromedriver`` (``--chromium``, ``--chromedriver``), so
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.demo import DEFAULT_PASSWORD, EMAIL, PROJECT_TITLE  # noqa: E402
from scripts.labelstudio_headless import Login, browser_session  # noqa: E402

LABEL_RGB = (255, 0, 255)          # the demo's label colour (scripts/demo.py LABEL_CONFIG, background="#FF00FF")
MIN_MASK_PIXELS = 400              # a mask drawn at the editor's scale covers far more than this
MAX_PNG_BYTES = 300_000


class ScreenshotError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('DEMO_LS_PORT') or 8080}")
    ap.add_argument("--task", type=int, default=None, help="task id (default: the best-scored prediction with a mask)")
    ap.add_argument("--out", default=None, help="default: docs/img/prelabel.png (interactive.png)")
    ap.add_argument("--size", default="1280x800", help="viewport WIDTHxHEIGHT")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for the editor to draw the mask")
    ap.add_argument("--interactive", action="store_true",
                    help="a sentence then an Alt-click (default --out docs/img/interactive.png)")
    return ap.parse_args(argv)


def demo_login() -> Login:
    """The demo user (``DEMO_DIR/login.json``, written by scripts/demo.py), else the default login."""
    path = Path(os.environ.get("DEMO_DIR") or ROOT / "demo_data") / "login.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return Login(saved["email"], saved["password"], saved["token"])
    return Login(EMAIL, os.environ.get("DEMO_PASSWORD") or DEFAULT_PASSWORD, "")


def find_task(url: str, login: Login, task: int | None) -> tuple[int, int]:
    """(project id, task id): the demo project, and ``task`` or its best-scored prediction that has a mask."""
    s = browser_session(url, login)
    projects = s.get(f"{url}/api/projects", params={"page_size": 100}, timeout=30).json()["results"]
    project = next((p["id"] for p in projects if p["title"] == PROJECT_TITLE), None)
    if project is None:
        raise ScreenshotError(f"no project {PROJECT_TITLE!r} at {url}: start scripts/demo.sh first")
    if task is not None:
        return project, task
    best = (-1.0, None)
    for t in s.get(f"{url}/api/tasks", params={"project": project, "page_size": 1000}, timeout=30).json()["tasks"]:
        for p in s.get(f"{url}/api/predictions", params={"task": t["id"]}, timeout=30).json():
            if any(r.get("type") == "brushlabels" for r in p.get("result") or []):
                best = max(best, (p.get("score") or 0.0, t["id"]), key=lambda b: b[0])
    if best[1] is None:
        raise ScreenshotError("no task of the demo project has a prediction with a mask: retrieve predictions first")
    return project, best[1]


def stage_interactive(url: str, login: Login, project: int) -> int:
    """A sentence, then the annotator's next click, through LS's interactive endpoint (the editor's calls); the id
    of a new task whose prediction is the refined answer plus the click."""
    from backend.labelstudio.brush import region_mask
    from scripts.demo import SCENE_SEED
    from ssp_sam.clicks import next_click
    from ssp_sam.data.synthetic import generate_sample
    from ssp_sam.metrics import iou

    api = requests.Session()
    api.headers["Authorization"] = f"Token {login.token}"

    def call(method, path, **kw):
        r = api.request(method, url + path, timeout=120, **kw)
        if r.status_code not in (200, 201):
            raise ScreenshotError(f"{method} {path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    def ask(ml, task, item) -> tuple[list, np.ndarray]:
        data = call("POST", f"/api/ml/{ml}/interactive-annotating", json={"task": task, "context": {"result": [item]}})
        result = (data.get("data") or {}).get("result") or []
        brush = [x for x in result if x["type"] == "brushlabels"]
        return result, (region_mask(brush[0]["value"], w, h) if brush else np.zeros((h, w), bool))

    ml = call("GET", "/api/ml", params={"project": project})[0]["id"]
    tasks = call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
    for t in sorted(tasks, key=lambda t: t["id"]):
        data = t["data"]
        truth = generate_sample(SCENE_SEED, data["scene"]).mask
        h, w = truth.shape
        _, alone = ask(ml, t["id"], {"id": "txt", "from_name": "prompt", "to_name": "image", "type": "textarea",
                                     "origin": "manual", "value": {"text": [data["text"]]}})
        click = next_click(alone, truth)
        if click is None or click.positive:
            continue
        point = {"id": "alt", "from_name": "click", "to_name": "image", "type": "keypointlabels", "origin": "manual",
                 "original_width": w, "original_height": h, "image_rotation": 0, "is_positive": False,
                 "value": {"x": 100 * (click.x + 0.5) / w, "y": 100 * (click.y + 0.5) / h, "width": 1.0,
                           "keypointlabels": ["object"]}}
        result, refined = ask(ml, t["id"], point)
        before, after = iou(alone, truth), iou(refined, truth)
        if after < before + 0.1:
            continue
        print(f"task {t['id']} {data['text']!r}: IoU {before:.2f} with the sentence, {after:.2f} after one Alt-click")
        call("POST", f"/api/projects/{project}/import", json=[dict(data)])
        copy = max(x["id"] for x in call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"])
        shown = {k: v for k, v in point.items() if k not in ("is_positive", "origin")}
        version = call("GET", f"/api/ml/{ml}").get("model_version") or "ssp-sam"
        call("POST", "/api/predictions", json={"task": copy, "model_version": version, "score": 1.0,
                                               "result": result + [shown]})
        return copy
    raise ScreenshotError("no demo task where the sentence's mask is too large and one Alt-click fixes it")


def open_browser(args: argparse.Namespace):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    width, height = (int(v) for v in args.size.split("x"))
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(args.chromedriver))
    # the viewport itself (a headless window's size includes no browser UI, but make it exact)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def log_in(driver, url: str, login: Login, timeout: float) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/user/login/")
    WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.NAME, "email")))
    driver.find_element(By.NAME, "email").send_keys(login.email)
    driver.find_element(By.NAME, "password").send_keys(login.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    try:
        WebDriverWait(driver, timeout).until(lambda d: "/user/login" not in d.current_url)
    except Exception:
        raise ScreenshotError(f"logging in as {login.email} failed (still on {driver.current_url})") from None


def canvas_box(driver) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the editor's image stage: the union of its canvases, in viewport pixels."""
    from selenium.webdriver.common.by import By

    rects = [c.rect for c in driver.find_elements(By.TAG_NAME, "canvas") if c.size["width"] > 50]
    if not rects:
        return (0, 0, 0, 0)
    return (int(min(r["x"] for r in rects)), int(min(r["y"] for r in rects)),
            int(max(r["x"] + r["width"] for r in rects)), int(max(r["y"] + r["height"] for r in rects)))


def mask_pixels(png: bytes, box: tuple[int, int, int, int]) -> int:
    """Pixels in (about) the label's colour inside ``box``: the mask as the editor draws it over the image."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(box)).astype(int)
    r, g, b = (rgb[..., i] for i in range(3))
    return int(((r > 150) & (b > 150) & (g < 110) & (abs(r - b) < 90)).sum())


def capture_editor(driver, url: str, project: int, task: int, timeout: float) -> bytes:
    """Open ``task`` in the editor; the screenshot once the region is listed and its mask is on the canvas."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/projects/{project}/data?tab=1&task={task}")
    try:
        WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".lsf-outliner-item")))
    except Exception:
        raise ScreenshotError(f"the editor listed no region for task {task} within {timeout:.0f} s "
                              f"(page {driver.current_url})") from None
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(1.0)                   # the image loads and the brush layer is drawn after the outliner
        png = driver.get_screenshot_as_png()
        found = mask_pixels(png, canvas_box(driver))
        if found >= MIN_MASK_PIXELS:
            print(f"task {task}: {found} pixels of the mask's colour on the image")
            return png
        if time.monotonic() > deadline:
            raise ScreenshotError(f"the editor shows no mask for task {task} after {timeout:.0f} s")


def save_small_png(png: bytes, out: Path) -> int:
    """A palette PNG (the page has few colours besides the image): a few hundred kB become well under the limit."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    size = out.stat().st_size
    if size > MAX_PNG_BYTES:
        raise ScreenshotError(f"{out} is {size} bytes, over {MAX_PNG_BYTES}")
    return size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out or str(ROOT / "docs" / "img" / ("interactive.png" if args.interactive else "prelabel.png"))
    login = demo_login()
    try:
        project, task = find_task(args.url, login, args.task)
        if args.interactive:
            task = stage_interactive(args.url, login, project)
        driver = open_browser(args)
        try:
            log_in(driver, args.url, login, args.timeout)
            png = capture_editor(driver, args.url, project, task, args.timeout)
        finally:
            driver.quit()
        size = save_small_png(png, Path(args.out))
    except (ScreenshotError, RuntimeError, requests.RequestException) as exc:
        print(f"screenshot failed: {exc}", file=sys.stderr)
        return 1
    print(f"saved {args.out} ({size // 1024} kB): project {project}, task {task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
