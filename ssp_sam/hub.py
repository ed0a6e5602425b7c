"""The official weights: where each file comes from, how it is verified, the folder they land in, and
``ssp-sam download-weights``.

An official variant (``ssp-sam-224``, ``ssp-sam-336``) needs three files:

* the **SSP-SAM checkpoint**, from the Hugging Face repository ``wayneicloud/SSP-SAM`` through huggingface_hub (which
  honours ``HF_ENDPOINT``, ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``). The repository's file names are not
  fixed by any document, so the file is chosen among the repository's files by :func:`select_checkpoint` (or named
  with ``--file``) and verified against the SHA-256 the hub reports for LFS files (the git blob id otherwise);
* **SAM ViT-H** ``sam_vit_h_4b8939.pth`` from the link of segment-anything's README, verified against its SHA-256
  and its MD5 (``4b8939`` in its name is the start of the file's MD5, not of its SHA-256);
* **OpenAI CLIP** ViT-B/16 (``ssp-sam-224``) or ViT-L/14@336px (``ssp-sam-336``) from the URL in openai/CLIP's
  ``clip/clip.py``, whose path carries the file's SHA-256; saved as ``CS-ViT-B-16.pt`` / ``CS-ViT-L-14-336px.pt``,
  the names under which the official code runs CLIP Surgery (this library always runs it for these variants).

A weights folder holds the three files and ``weights.json`` (:class:`WeightsManifest`: variant, dataset, file names,
hashes, sources). ``ModelConfig.weights_dir`` (``--weights-dir``; ``SSP_SAM_WEIGHTS_DIR`` for the backend and the
trainer) names such a folder and fills in whichever of the three paths is not given (:func:`apply_weights_dir`).

Downloads of SAM and CLIP resume from a ``.part`` file (HTTP ``Range``); huggingface_hub resumes its own. A file whose
hash is wrong is deleted and the run fails. A file lock on the folder keeps two processes (backend workers, replicas,
the trainer) from downloading into it at the same time: the second waits, then finds everything verified.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from .io import write_text_atomic

log = logging.getLogger(__name__)

HF_REPO = "wayneicloud/SSP-SAM"
HF_REVISION = "main"
SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"      # segment-anything's README
CLIP_BASE_URL = "https://openaipublic.azureedge.net/clip/models"        # openai/CLIP clip/clip.py, _MODELS
DEFAULT_DATASET = "refcoco"
MANIFEST = "weights.json"
MANIFEST_FORMAT = "ssp-sam-weights/1"
LOCK_FILE = ".weights.lock"
PROGRESS_FILE = ".progress.json"
ROLES = ("checkpoint", "sam", "clip")
CONFIG_FIELD = {"checkpoint": "checkpoint", "sam": "sam_checkpoint", "clip": "clip_checkpoint"}  # ModelConfig names


class WeightsError(RuntimeError):
    """Weights that cannot be had or used; the message is one line, fit for a user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------------------------------------------
# the files


@dataclass(frozen=True)
class RemoteFile:
    """A base weight file at ``<base URL>/<path>``; the base comes from an environment variable when it is set
    (:func:`base_url`), so a mirror with the same layout can stand in."""

    role: str                    # "sam" or "clip"
    name: str                    # its name in a weights folder
    path: str                    # under the base URL
    sha256: str
    md5: Optional[str] = None
    size: Optional[int] = None

    def url(self, env: Optional[Mapping[str, str]] = None) -> str:
        return f"{base_url(self.role, env)}/{self.path}"


def base_url(role: str, env: Optional[Mapping[str, str]] = None) -> str:
    """The base URL of SAM (``SAM_WEIGHTS_URL``) or CLIP (``CLIP_WEIGHTS_URL``) files, read at every call."""
    env = os.environ if env is None else env
    urls = {"sam": env.get("SAM_WEIGHTS_URL") or SAM_BASE_URL, "clip": env.get("CLIP_WEIGHTS_URL") or CLIP_BASE_URL}
    return urls[role].strip().rstrip("/")


# The SHA-256 and size of sam_vit_h_4b8939.pth are not published by Meta; they are the values that independent
# projects pin for this URL (and the LFS hash of copies of the file on Hugging Face). The MD5 is the one whose first six
# hex digits the file name carries, which segment-anything's release used as its check.
SAM_VIT_H = RemoteFile("sam", "sam_vit_h_4b8939.pth", "sam_vit_h_4b8939.pth",
                       sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                       md5="4b8939a88964f0f4ff5f5b2642c598a6", size=2_564_550_879)
_B16 = "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
_L14_336 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
CLIP_VIT_B_16 = RemoteFile("clip", "CS-ViT-B-16.pt", f"{_B16}/ViT-B-16.pt", sha256=_B16)
CLIP_VIT_L_14_336 = RemoteFile("clip", "CS-ViT-L-14-336px.pt", f"{_L14_336}/ViT-L-14-336px.pt", sha256=_L14_336)

# variant -> (SAM, CLIP); the variants' specs are in build.VARIANTS (tests hold the two tables to each other)
OFFICIAL_WEIGHTS: dict[str, tuple[RemoteFile, RemoteFile]] = {
    "ssp-sam-224": (SAM_VIT_H, CLIP_VIT_B_16),
    "ssp-sam-336": (SAM_VIT_H, CLIP_VIT_L_14_336),
}

# How a path of the SSP-SAM repository names a variant and a dataset (see select_checkpoint). The official configs
# call the datasets unc, unc+, gref, gref_umd, referit, grefcoco, phrase_cut and merge; the README's folders are
# ckpts/vpp-sam/merge/{224px,336px}/...
VARIANT_MARKERS: dict[str, tuple[str, ...]] = {
    "ssp-sam-224": ("224", "224px", "clip_b", "clip-b", "vit-b-16", "vit_b_16", "vitb16", "b16"),
    "ssp-sam-336": ("336", "336px", "clip_l", "clip-l", "vit-l-14", "vit_l_14", "vitl14", "l14"),
}
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "refcoco": ("refcoco", "unc"),
    "refcoco+": ("refcoco+", "unc+", "refcocoplus", "refcoco_plus", "refcoco-plus"),
    "refcocog": ("refcocog", "refcocog_umd", "refcocog-umd", "gref_umd", "umd"),
    "refcocog-google": ("refcocog_google", "refcocog-google", "gref", "google"),
    "referit": ("referit", "refclef"),
    "grefcoco": ("grefcoco",),
    "phrasecut": ("phrasecut", "phrase_cut"),
    "merge": ("merge",),
}
CHECKPOINT_SUFFIXES = (".pth", ".pt")
PREFERRED_CHECKPOINT = "checkpoint_best_miou.pth"


def default_out(variant: str, dataset: str = DEFAULT_DATASET) -> str:
    return os.path.join("weights", f"{variant}-{dataset}")


def download_command(variant: str, dataset: str = DEFAULT_DATASET, out: Optional[str] = None) -> str:
    """The command that fetches a variant's weights (error messages quote it)."""
    return (f"ssp-sam download-weights --variant {variant} --dataset {dataset} "
            f"--out {out or default_out(variant, dataset)}")


# ----------------------------------------------------------------------------------------------------------------
# choosing the SSP-SAM checkpoint among the repository's files

_WORD = "a-z0-9+"          # a name is whole when no letter, digit or '+' touches it ("refcoco" is not in "refcoco+")


def _names_in(text: str, table: Mapping[str, Iterable[str]]) -> set[str]:
    """Keys of ``table`` whose names occur in ``text`` as whole words; a longer name takes its place first, so
    "gref_umd" is refcocog and not also the "gref" of refcocog-google."""
    text = text.lower()
    hits = []
    for key, names in table.items():
        for name in names:
            for m in re.finditer(rf"(?<![{_WORD}]){re.escape(name.lower())}(?![{_WORD}])", text):
                hits.append((m.end() - m.start(), m.start(), m.end(), key))
    taken: list[tuple[int, int]] = []
    found: set[str] = set()
    for _, start, end, key in sorted(hits, key=lambda h: -h[0]):
        if all(end <= s or start >= e for s, e in taken):
            taken.append((start, end))
            found.add(key)
    return found


def _dataset_table(dataset: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    key = dataset.lower()
    table = dict(DATASET_ALIASES)
    table.setdefault(key, (key,))
    return key, table


def describe_rule(variant: str, dataset: str) -> str:
    key, table = _dataset_table(dataset)
    return (f"a {'/'.join(CHECKPOINT_SUFFIXES)} file whose path names {variant} "
            f"({', '.join(VARIANT_MARKERS.get(variant, ()))}) and {dataset} ({', '.join(table[key])}) and no other "
            f"variant or dataset; {PREFERRED_CHECKPOINT} first, then a name with 'best'")


def select_checkpoint(files: Iterable[str], variant: str, dataset: str, where: str = HF_REPO) -> str:
    """The repository file that holds ``variant``'s checkpoint fine-tuned on ``dataset``.

    A candidate ends in ``.pth`` or ``.pt``; its path names the variant (``224``, ``224px``, ``clip_b``, ... for
    ``ssp-sam-224``) and no other, and the dataset (its aliases: ``refcoco`` or ``unc``, ...) and no other. Among the
    candidates ``checkpoint_best_miou.pth`` comes first, then names with ``best``, then the rest; several at the best
    rank, or none, is an error that lists them (``--file`` then names one)."""
    files = sorted(files)
    key, datasets = _dataset_table(dataset)
    ranked: dict[int, list[str]] = {}
    for path in files:
        if not path.lower().endswith(CHECKPOINT_SUFFIXES):
            continue
        if _names_in(path, VARIANT_MARKERS) != {variant} or _names_in(path, datasets) != {key}:
            continue
        name = path.rsplit("/", 1)[-1].lower()
        rank = 0 if name == PREFERRED_CHECKPOINT else 1 if "best" in name else 2
        ranked.setdefault(rank, []).append(path)
    if not ranked:
        shown = ", ".join(files[:60]) + (f" (+{len(files) - 60} more)" if len(files) > 60 else "")
        raise WeightsError(f"no file of {where} matches variant {variant} and dataset {dataset} (the rule: "
                           f"{describe_rule(variant, dataset)}); its files: {shown or 'none'}; name one with --file")
    best = ranked[min(ranked)]
    if len(best) > 1:
        raise WeightsError(f"{len(best)} files of {where} match variant {variant} and dataset {dataset}: "
                           f"{', '.join(best)}; name one with --file")
    return best[0]


# ----------------------------------------------------------------------------------------------------------------
# the folder and its manifest


@dataclass
class WeightsManifest:
    """``weights.json`` of a weights folder. ``files[role]`` (role: checkpoint, sam, clip) holds ``name`` (in the
    folder), ``sha256``, ``size``, ``source`` (URL), ``verified`` (how) and ``mtime_ns`` (of the file when verified)."""

    folder: Path
    variant: str
    dataset: str
    files: dict[str, dict]
    request: dict = field(default_factory=dict)
    created_at: Optional[str] = None

    def path(self, role: str) -> str:
        return str(self.folder / self.files[role]["name"])

    def paths(self) -> dict[str, str]:
        """ModelConfig field -> file path."""
        return {CONFIG_FIELD[role]: self.path(role) for role in ROLES}

    def missing(self) -> list[str]:
        """Files of the manifest that are not in the folder at their recorded size."""
        out = []
        for role in ROLES:
            p = self.folder / self.files[role]["name"]
            if not p.is_file() or p.stat().st_size != self.files[role].get("size"):
                out.append(self.files[role]["name"])
        return out

    def unchanged(self, role: str) -> bool:
        """The file is as it was when it was verified (same size and modification time)."""
        rec = self.files.get(role) or {}
        try:
            st = (self.folder / rec["name"]).stat()
        except (KeyError, OSError):
            return False
        return st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns")

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "variant": self.variant, "dataset": self.dataset, "files": self.files,
                "request": self.request, "created_at": self.created_at}

    def write(self) -> None:
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.to_json(), indent=2) + "\n")


def read_manifest(folder: str | os.PathLike) -> WeightsManifest:
    """The manifest of a weights folder; a clear :class:`WeightsError` when the folder is not one."""
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise WeightsError(f"weights folder {folder} does not exist (a folder written by `ssp-sam download-weights`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise WeightsError(f"{folder} has no {MANIFEST}: it is not a folder written by `ssp-sam download-weights` "
                           f"(or that command did not finish; run it again with --out {folder})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        files = data["files"]
        for role in ROLES:
            if not isinstance(files.get(role), dict) or not isinstance(files[role].get("name"), str):
                raise ValueError(f"no '{role}' file")
            if Path(files[role]["name"]).name != files[role]["name"]:
                raise ValueError(f"file name {files[role]['name']!r} leaves the folder")
        return WeightsManifest(folder=folder, variant=str(data["variant"]), dataset=str(data.get("dataset") or ""),
                               files=files, request=dict(data.get("request") or {}),
                               created_at=data.get("created_at"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path} is unreadable ({type(exc).__name__}: {exc}); run `ssp-sam download-weights` "
                           f"again with --out {folder}") from None


def folder_complete(folder: str | os.PathLike, variant: Optional[str] = None, dataset: Optional[str] = None) -> bool:
    """The folder has a manifest (of this variant and dataset, when given) and every file it lists, at its size."""
    try:
        m = read_manifest(folder)
    except WeightsError:
        return False
    if (variant and m.variant != variant) or (dataset and m.dataset != dataset):
        return False
    return not m.missing()


def resolve_variant(requested: Optional[str], manifest: WeightsManifest) -> str:
    """The variant to build with a weights folder: the folder's, when none (or the default ``demo``) is asked for."""
    if not requested or requested == "demo" or requested == manifest.variant:
        return manifest.variant
    raise WeightsError(f"{manifest.folder} holds {manifest.variant} weights, but variant {requested} was asked for: "
                       f"use {manifest.variant} (or leave the variant unset), or another weights folder")


def apply_weights_dir(cfg: Any) -> Any:
    """``cfg`` (a ``build.ModelConfig``) with the files of ``cfg.weights_dir`` filled in where no path is given, and
    the folder's variant; unchanged without a weights folder."""
    import dataclasses

    if not getattr(cfg, "weights_dir", None):
        return cfg
    m = read_manifest(cfg.weights_dir)
    missing = m.missing()
    if missing:
        raise WeightsError(f"{m.folder} lacks {', '.join(missing)} (or they changed size): run "
                           f"`{download_command(m.variant, m.dataset or DEFAULT_DATASET, str(m.folder))}` again")
    filled = {f: getattr(cfg, f) or path for f, path in m.paths().items()}
    return dataclasses.replace(cfg, variant=resolve_variant(cfg.variant, m), **filled)


# ----------------------------------------------------------------------------------------------------------------
# progress


@dataclass
class DownloadProgress:
    """Where a download stands. ``state``: listing, downloading, verifying, waiting (another process holds the
    folder's lock) or done."""

    state: str = "listing"
    file: Optional[str] = None
    bytes_done: int = 0
    bytes_total: Optional[int] = None
    pid: int = field(default_factory=os.getpid)

    def describe(self) -> str:
        done = self.bytes_done / 1e6
        if self.bytes_total:
            return f"{done:,.0f} of {self.bytes_total / 1e6:,.0f} MB"
        return f"{done:,.0f} MB so far"

    def to_json(self) -> dict:
        return {"state": self.state, "file": self.file, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total, "pid": self.pid}

    @classmethod
    def from_json(cls, d: Mapping) -> "DownloadProgress":
        return cls(state=str(d.get("state") or "downloading"), file=d.get("file"),
                   bytes_done=int(d.get("bytes_done") or 0), bytes_total=d.get("bytes_total"),
                   pid=int(d.get("pid") or 0))


ProgressCallback = Callable[[DownloadProgress], None]


class _Tracker:
    """Adds up the bytes of every planned file and tells ``callback`` at every step; writes the folder's progress file
    (what a process waiting for the lock shows) at most every ``interval`` seconds, and on every change of state."""

    def __init__(self, folder: Path, callback: Optional[ProgressCallback], interval: float = 0.5):
        self.folder, self.callback, self.interval = folder, callback, interval
        self.totals: dict[str, Optional[int]] = {}
        self.done: dict[str, int] = {}
        self.state, self.file = "listing", None
        self._written = 0.0

    def expect(self, name: str, size: Optional[int]) -> None:
        self.totals[name] = size
        self.done.setdefault(name, 0)

    def snapshot(self) -> DownloadProgress:
        totals = list(self.totals.values())
        total = sum(totals) if totals and all(t is not None for t in totals) else None
        return DownloadProgress(self.state, self.file, sum(self.done.values()), total)

    def set(self, name: str, done: int) -> None:
        self.done[name] = done
        self._emit(False)

    def phase(self, state: str, name: Optional[str] = None) -> None:
        self.state, self.file = state, name
        self._emit(True)

    def report(self, progress: DownloadProgress) -> None:
        """Pass on another process's progress (while waiting for the lock)."""
        if self.callback:
            self.callback(progress)

    def _emit(self, force: bool) -> None:
        snap = self.snapshot()
        if self.callback:
            self.callback(snap)
        now = time.monotonic()
        if force or now - self._written >= self.interval:
            self._written = now
            with contextlib.suppress(OSError):
                write_text_atomic(self.folder / PROGRESS_FILE, json.dumps(snap.to_json()))


def read_progress(folder: str | os.PathLike) -> Optional[DownloadProgress]:
    """The progress the process downloading into ``folder`` last wrote (None when there is none)."""
    try:
        return DownloadProgress.from_json(json.loads((Path(folder) / PROGRESS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# hashes and network errors


def file_hashes(path: Path, with_md5: bool = False, with_git: bool = False) -> dict[str, str]:
    """SHA-256 (and the MD5, and git's blob id) of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False) if with_md5 else None
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False) if with_git else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            sha.update(chunk)
            if md5 is not None:
                md5.update(chunk)
            if git is not None:
                git.update(chunk)
    out = {"sha256": sha.hexdigest()}
    if md5 is not None:
        out["md5"] = md5.hexdigest()
    if git is not None:
        out["git"] = git.hexdigest()
    return out


def _reason(exc: BaseException) -> str:
    """A short reason for a network failure, from the innermost cause that says something."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        if isinstance(e, socket.gaierror) or "Name or service not known" in str(e) or "nodename nor servname" in str(e):
            return "the host name does not resolve"
        if isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e):
            return "connection refused"
        if isinstance(e, TimeoutError) or "timed out" in str(e).lower():
            return "timed out"
    text = str(chain[-1]) or type(chain[-1]).__name__
    return text.splitlines()[0][:200]


def _network_error(url: str, exc: BaseException, hint: str) -> WeightsError:
    host = urlsplit(url).netloc or url
    return WeightsError(f"cannot reach {host} ({_reason(exc)}); {hint}")


# ----------------------------------------------------------------------------------------------------------------
# SAM and CLIP: plain HTTPS with resume


def _verify(path: Path, spec: RemoteFile) -> Optional[str]:
    """None when ``path`` is ``spec``'s file, else what is wrong."""
    if spec.size is not None and path.stat().st_size != spec.size:
        return f"size {path.stat().st_size} bytes, expected {spec.size}"
    got = file_hashes(path, with_md5=spec.md5 is not None)
    if got["sha256"] != spec.sha256:
        return f"SHA-256 {got['sha256']}, expected {spec.sha256}"
    if spec.md5 is not None and got["md5"] != spec.md5:
        return f"MD5 {got['md5']}, expected {spec.md5}"
    return None


def _content_range_start(value: Optional[str]) -> Optional[int]:
    m = re.match(r"bytes (\d+)-", value or "")
    return int(m.group(1)) if m else None


def fetch_url(spec: RemoteFile, dest: Path, tracker: _Tracker, *, attempts: int = 3, timeout: float = 60.0,
              quiet: bool = False) -> dict:
    """Download ``spec`` to ``dest``: resumable from ``dest.part`` (HTTP Range), verified before it takes its name.

    Written by hand rather than with ``torch.hub.download_url_to_file``: that one checks only a SHA-256 prefix and
    starts over after every interruption (a 2.5 GB file over a flaky line may never finish); huggingface_hub's resumable
    downloader is internal to it. Returns the manifest record."""
    import http.client

    import requests
    import urllib3
    from tqdm.auto import tqdm

    url = spec.url()
    hint = f"check the network, or set {'SAM' if spec.role == 'sam' else 'CLIP'}_WEIGHTS_URL to a mirror"
    part = dest.with_name(dest.name + ".part")
    with requests.Session() as session:
        for attempt in range(1, attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if spec.size is not None and have > spec.size:
                part.unlink()
                have = 0
            started = False
            try:
                headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else \
                    {"Accept-Encoding": "identity"}
                with session.get(url, headers=headers, stream=True, timeout=(15, timeout)) as r:
                    started = True
                    if r.status_code == 416 and have:          # the part is already whole
                        break
                    if r.status_code >= 400:
                        raise WeightsError(f"{url}: HTTP {r.status_code} {r.reason}; {hint}")
                    if r.status_code == 206 and _content_range_start(r.headers.get("Content-Range")) != have:
                        part.unlink(missing_ok=True)            # an answer for another range: start over
                        continue
                    if r.status_code != 206:
                        have = 0                                # the server ignored the range: from the start
                    length = r.headers.get("Content-Length")
                    total = have + int(length) if length and length.isdigit() else spec.size
                    tracker.expect(dest.name, total)
                    tracker.phase("downloading", dest.name)
                    done = have
                    with open(part, "ab" if have else "wb") as f, \
                            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name,
                                 disable=quiet, file=sys.stderr) as bar:
                        # read1: what has arrived (up to 1 MiB), so the bytes before a dropped connection are kept
                        for chunk in iter(lambda: r.raw.read1(1 << 20), b""):
                            f.write(chunk)
                            done += len(chunk)
                            bar.update(len(chunk))
                            tracker.set(dest.name, done)
                break
            except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                    ConnectionError, TimeoutError) as exc:
                if not started:                                  # nothing answered: no use trying again now
                    raise _network_error(url, exc, hint) from None
                kept = part.stat().st_size if part.exists() else 0
                if attempt == attempts:
                    raise WeightsError(f"downloading {url} broke off {attempts} times ({_reason(exc)}); {part} keeps "
                                       f"the {kept} bytes received: run the command again to resume") from None
                log.warning("download of %s broke off after %d bytes (%s); resuming", url, kept, _reason(exc))
        else:
            raise WeightsError(f"{url} answered {attempts} times with another byte range than asked for; {hint}")
    tracker.phase("verifying", dest.name)
    problem = _verify(part, spec)
    if problem:
        part.unlink(missing_ok=True)
        raise WeightsError(f"{url} gave a file with {problem}; the partial file was deleted: run again, or check "
                           f"the mirror ({'SAM' if spec.role == 'sam' else 'CLIP'}_WEIGHTS_URL)")
    os.replace(part, dest)
    return _record(dest, spec.sha256, url, "SHA-256" + (" and MD5" if spec.md5 else "") + " of the official file",
                   md5=spec.md5)


def _record(file: Path, sha256: str, source: str, verified: str, **more) -> dict:
    st = file.stat()
    rec = {"name": file.name, "sha256": sha256, "size": st.st_size, "source": source, "verified": verified,
           "mtime_ns": st.st_mtime_ns}
    rec.update({k: v for k, v in more.items() if v is not None})
    return rec


# ----------------------------------------------------------------------------------------------------------------
# the SSP-SAM checkpoint: huggingface_hub


@dataclass(frozen=True)
class HubFile:
    path: str
    size: Optional[int]
    sha256: Optional[str]        # LFS files
    blob_id: Optional[str]       # git's id of the blob (for an LFS file: of its pointer)


def hf_endpoint() -> str:
    """``HF_ENDPOINT`` as huggingface_hub reads it, but at every call (the library reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _hub_error(exc: BaseException, repo: str, revision: str, endpoint: str, path: Optional[str] = None) -> WeightsError:
    from huggingface_hub import errors

    what = f"{repo}/{path}" if path else repo
    if isinstance(exc, errors.GatedRepoError):
        return WeightsError(f"{repo} is gated: accept its terms at {endpoint}/{repo} and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return WeightsError(f"{repo} was not found at {endpoint} (a private repository needs HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return WeightsError(f"{repo} has no revision {revision!r}")
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return WeightsError(f"{what} does not exist at revision {revision}")
    if isinstance(exc, errors.OfflineModeIsEnabled) or (isinstance(exc, errors.LocalEntryNotFoundError)
                                                         and _offline()):
        return WeightsError(f"offline (HF_HUB_OFFLINE is set) and {what} is not in the Hugging Face cache "
                            f"(HF_HOME); download it once online, or copy a weights folder")
    if isinstance(exc, errors.HfHubHTTPError) and getattr(exc, "response", None) is not None:
        status = exc.response.status_code
        first = (str(exc).splitlines() or [""])[0][:200]
        return WeightsError(f"{endpoint} answered HTTP {status} for {what}: {first}")
    return _network_error(endpoint, exc, "check the network, or set HF_ENDPOINT to a mirror (HF_HUB_OFFLINE=1 to "
                                         "use the Hugging Face cache)")


def _list_cached(repo: str, revision: str) -> tuple[str, dict[str, HubFile]]:
    """Offline: the files of ``repo`` at ``revision`` that the Hugging Face cache holds."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        cache = None
    for cached in (cache.repos if cache else ()):
        if cached.repo_id != repo or cached.repo_type != "model":
            continue
        for rev in cached.revisions:
            if rev.commit_hash == revision or revision in rev.refs:
                files = {}
                for f in rev.files:
                    blob = Path(f.blob_path).name
                    rel = Path(f.file_path).relative_to(rev.snapshot_path).as_posix()
                    files[rel] = HubFile(rel, f.size_on_disk, blob if len(blob) == 64 else None,
                                         blob if len(blob) == 40 else None)
                return rev.commit_hash, files
    raise WeightsError(f"offline (HF_HUB_OFFLINE is set) and {repo}@{revision} is not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}); download once online, or copy a weights folder")


def list_hub_files(repo: str = HF_REPO, revision: str = HF_REVISION) -> tuple[str, dict[str, HubFile]]:
    """(commit, {path: HubFile}) of a model repository: from the hub, or from the cache when offline."""
    if _offline():
        return _list_cached(repo, revision)
    from huggingface_hub import HfApi

    endpoint = hf_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (_hub_error)
        raise _hub_error(exc, repo, revision, endpoint) from None
    files = {s.rfilename: HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
             for s in info.siblings or []}
    return info.sha or revision, files


def _progress_bar(tracker: _Tracker, name: str, quiet: bool):
    """huggingface_hub's own progress bar (``HF_HUB_DISABLE_PROGRESS_BARS`` applies), also telling ``tracker``;
    hidden when ``quiet``."""
    from huggingface_hub.utils import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            if quiet:
                kwargs["disable"] = True
            self._bytes = int(kwargs.get("initial") or 0)
            super().__init__(*args, **kwargs)
            if kwargs.get("total"):
                tracker.expect(name, int(kwargs["total"]))
            tracker.set(name, self._bytes)

        def update(self, n=1):
            self._bytes += int(n or 0)
            tracker.set(name, self._bytes)
            return super().update(n)

    return Bar


def _place(src: Path, dest: Path) -> None:
    """Put the cached blob ``src`` at ``dest``: a hard link when both are on one filesystem (no second copy), else a
    copy; never a symbolic link (it would dangle once the cache is gone, e.g. a build's cache mount)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def fetch_checkpoint(folder: Path, entry: HubFile, repo: str, revision: str, commit: str, tracker: _Tracker,
                     quiet: bool = False) -> dict:
    """Download one repository file through huggingface_hub (its cache, its resume), verify it, and place it in
    ``folder`` under its base name. Asked for by ``revision`` (a branch), so the cache records the branch for offline
    use; ``commit`` is what the listing saw (a newer commit in between fails the hash check). Returns the manifest
    record."""
    from huggingface_hub import hf_hub_download

    endpoint = hf_endpoint()
    name = entry.path.rsplit("/", 1)[-1]
    tracker.expect(name, entry.size)
    tracker.phase("downloading", name)
    try:
        cached = Path(hf_hub_download(repo, entry.path, revision=revision, endpoint=endpoint,
                                      local_files_only=_offline(), tqdm_class=_progress_bar(tracker, name, quiet)))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (_hub_error)
        raise _hub_error(exc, repo, revision, endpoint, entry.path) from None
    tracker.set(name, entry.size or cached.stat().st_size)
    tracker.phase("verifying", name)
    blob = cached.resolve()
    got = file_hashes(blob, with_git=entry.sha256 is None)
    if entry.sha256 is not None:
        ok, how = got["sha256"] == entry.sha256, "SHA-256 reported by the hub (LFS)"
    elif entry.blob_id is not None:
        ok, how = got["git"] == entry.blob_id, "git blob id reported by the hub"
    else:
        raise WeightsError(f"{repo}/{entry.path}: the hub reports no hash for it, so it cannot be verified")
    if not ok:
        for p in (cached, blob):
            p.unlink(missing_ok=True)
        raise WeightsError(f"{repo}/{entry.path} does not match the {how}; the cached copy was deleted: run again")
    dest = folder / name
    _place(blob, dest)
    return _record(dest, got["sha256"], f"{endpoint}/{repo}/blob/{commit}/{entry.path}", how,
                   repo=repo, path=entry.path, commit=commit)


# ----------------------------------------------------------------------------------------------------------------
# the whole download


@contextlib.contextmanager
def _folder_lock(folder: Path, tracker: _Tracker, quiet: bool) -> Iterator[None]:
    """Hold the folder's lock; while another process holds it, pass on that process's progress."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not quiet:
            print(f"another process is downloading into {folder}; waiting for it", file=sys.stderr)
        while True:
            theirs = read_progress(folder) or DownloadProgress(state="waiting", pid=0)
            theirs.state = "waiting"
            tracker.report(theirs)
            try:
                lock.acquire(timeout=0.5)
                break
            except Timeout:
                continue
    try:
        yield
    finally:
        lock.release()


def _existing(folder: Path) -> Optional[WeightsManifest]:
    try:
        return read_manifest(folder)
    except WeightsError:
        return None


def _head_size(url: str) -> Optional[int]:
    """The size a server announces for ``url`` (for the progress total; None when it does not say)."""
    import requests

    try:
        r = requests.head(url, allow_redirects=True, timeout=15, headers={"Accept-Encoding": "identity"})
        length = r.headers.get("Content-Length")
        return int(length) if r.ok and length and length.isdigit() else None
    except requests.RequestException:
        return None


def download_weights(variant: str, dataset: str = DEFAULT_DATASET, out: Optional[str | os.PathLike] = None, *,
                     file: Optional[str] = None, repo: str = HF_REPO, revision: str = HF_REVISION,
                     recheck: bool = False, progress: Optional[ProgressCallback] = None,
                     quiet: bool = False) -> WeightsManifest:
    """Fetch everything ``variant`` needs into ``out`` and write its manifest; what is already there and verified
    is not fetched again. ``file``: the repository path of the SSP-SAM checkpoint (else :func:`select_checkpoint`).
    ``recheck``: hash every file present again, and ask the hub again which checkpoint matches. Raises
    :class:`WeightsError` (one line) on any failure."""
    if variant not in OFFICIAL_WEIGHTS:
        raise WeightsError(f"no official weights for variant {variant!r}; download-weights knows "
                           f"{', '.join(OFFICIAL_WEIGHTS)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+_.-]*", dataset or ""):
        raise WeightsError(f"dataset {dataset!r}: use letters, digits and + _ . - (e.g. refcoco, refcoco+, refcocog)")
    folder = Path(out or default_out(variant, dataset)).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create {folder}: {exc.strerror or exc}") from None
    tracker = _Tracker(folder, progress)
    with _folder_lock(folder, tracker, quiet):
        manifest = _download_locked(folder, variant, dataset, file, repo, revision, recheck, tracker, quiet)
    tracker.phase("done")
    with contextlib.suppress(OSError):
        (folder / PROGRESS_FILE).unlink()
    return manifest


def _download_locked(folder: Path, variant: str, dataset: str, file: Optional[str], repo: str, revision: str,
                     recheck: bool, tracker: _Tracker, quiet: bool) -> WeightsManifest:
    request = {"variant": variant, "dataset": dataset, "repo": repo, "revision": revision, "file": file}
    old = _existing(folder)
    if old is not None and (old.variant, old.dataset) != (variant, dataset):
        raise WeightsError(f"{folder} already holds {old.variant} weights for {old.dataset}: give another --out")
    records: dict[str, dict] = {}
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr))

    # the SSP-SAM checkpoint: no network at all when the folder already holds what this request asked for
    todo_checkpoint = None
    if old is not None and not recheck and old.request == request and old.unchanged("checkpoint"):
        records["checkpoint"] = dict(old.files["checkpoint"])
    else:
        tracker.phase("listing")
        commit, files = list_hub_files(repo, revision)
        where = f"{repo}@{revision}"
        if file is not None:
            if file not in files:
                shown = ", ".join(sorted(files)[:60])
                raise WeightsError(f"{where} has no file {file!r}; its files: {shown or 'none'}")
            path = file
        else:
            path = select_checkpoint(files, variant, dataset, where)
        entry = files[path]
        rec = old.files.get("checkpoint") if old is not None else None
        dest = folder / path.rsplit("/", 1)[-1]
        kept = None
        if entry.sha256 and rec is not None and rec.get("name") == dest.name:
            kept = _still_verified(folder, rec, recheck, entry.sha256)
        elif entry.sha256 and dest.is_file() and dest.stat().st_size == entry.size \
                and file_hashes(dest)["sha256"] == entry.sha256:         # there without a manifest: keep it
            kept = _record(dest, entry.sha256, f"{hf_endpoint()}/{repo}/blob/{commit}/{path}",
                           "SHA-256 reported by the hub (LFS; found in the folder)")
        if kept is not None:
            records["checkpoint"] = {**kept, "repo": repo, "path": path, "commit": commit}
        else:
            todo_checkpoint = (entry, commit)
        say(f"SSP-SAM checkpoint: {repo}/{path} (revision {commit[:12]})")

    # SAM and CLIP: kept when the file in the folder is the official one
    todo_urls = []
    for spec in OFFICIAL_WEIGHTS[variant]:
        dest = folder / spec.name
        rec = old.files.get(spec.role) if old is not None else None
        kept = _still_verified(folder, rec, recheck, spec.sha256) if rec and rec.get("name") == spec.name else None
        if kept is not None:
            records[spec.role] = kept
        elif dest.is_file() and _verify(dest, spec) is None:
            records[spec.role] = _record(dest, spec.sha256, spec.url(), "SHA-256 of the official file (found in "
                                         "the folder)", md5=spec.md5)
        else:
            todo_urls.append(spec)

    # the plan's sizes first, so that the progress has a total from the start
    if todo_checkpoint is not None:
        tracker.expect(todo_checkpoint[0].path.rsplit("/", 1)[-1], todo_checkpoint[0].size)
    for spec in todo_urls:
        tracker.expect(spec.name, spec.size if spec.size is not None else _head_size(spec.url()))
    if todo_checkpoint is not None:
        records["checkpoint"] = fetch_checkpoint(folder, todo_checkpoint[0], repo, revision, todo_checkpoint[1],
                                                 tracker, quiet)
    for spec in todo_urls:
        say(f"{spec.name}: {spec.url()}")
        records[spec.role] = fetch_url(spec, folder / spec.name, tracker, quiet=quiet)
    if not todo_urls and todo_checkpoint is None:
        say(f"{folder}: every file is present and verified; nothing to download")

    manifest = WeightsManifest(folder=folder, variant=variant, dataset=dataset, files=records, request=request,
                               created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest.write()
    if old is not None:                       # a checkpoint the folder held before under another name goes
        previous = old.files["checkpoint"]["name"]
        if previous not in {rec["name"] for rec in records.values()}:
            (folder / previous).unlink(missing_ok=True)
    return manifest


def _still_verified(folder: Path, rec: Optional[Mapping], recheck: bool,
                    sha256: Optional[str] = None) -> Optional[dict]:
    """The record of a file verified earlier, when the file is still that one: unchanged since (size, mtime), or
    hashed again (``recheck``, or a changed mtime); ``sha256``: the hash it must have. None otherwise."""
    if rec is None or (sha256 is not None and rec.get("sha256") != sha256):
        return None
    path = folder / str(rec.get("name"))
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_size != rec.get("size"):
        return None
    if not recheck and st.st_mtime_ns == rec.get("mtime_ns"):
        return dict(rec)
    if file_hashes(path)["sha256"] != rec.get("sha256"):
        return None
    return {**rec, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------------------------------------------
# the command


def env_values(manifest: WeightsManifest) -> dict[str, str]:
    return {"SSP_SAM_VARIANT": manifest.variant, "SSP_SAM_WEIGHTS_DIR": str(manifest.folder)}


def update_env_file(path: str | os.PathLike, values: Mapping[str, str]) -> None:
    """Set ``values`` in a ``.env``-style file: lines of these names are replaced, the others kept, the missing
    appended (the file keeps its permissions; it may hold secrets)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    out, seen = [], set()
    for line in lines:
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m and m.group(1) in values:
            if m.group(1) not in seen:
                out.append(f"{m.group(1)}={values[m.group(1)]}")
                seen.add(m.group(1))
            continue
        out.append(line)
    out += [f"{k}={v}" for k, v in values.items() if k not in seen]
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    write_text_atomic(path, "\n".join(out) + "\n", permissions=mode)


def _cli(args: argparse.Namespace) -> int:
    try:
        manifest = download_weights(args.variant, args.dataset, args.out, file=args.file, repo=args.repo,
                                    revision=args.revision, recheck=args.recheck)
        values = env_values(manifest)
        if args.env_file:
            update_env_file(args.env_file, values)
    except WeightsError as exc:
        print(f"download-weights: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("download-weights: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"download-weights: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}",
              file=sys.stderr)
        return 1
    for role in ROLES:
        rec = manifest.files[role]
        print(f"{rec['name']}: {rec['size'] / 1e6:,.1f} MB, verified ({rec['verified']})", file=sys.stderr)
    if args.env_file:
        print(f"wrote {', '.join(values)} to {args.env_file}", file=sys.stderr)
    else:
        print("set these for the backend and the trainer (or give --env-file .env):", file=sys.stderr)
    print("\n".join(f"{k}={v}" for k, v in values.items()))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("download-weights", help="fetch and verify the official weights of a variant (SSP-SAM "
                                                "checkpoint, SAM ViT-H, OpenAI CLIP) into one folder",
                       description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True, help=f"one of {', '.join(OFFICIAL_WEIGHTS)}")
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help=f"the dataset the SSP-SAM checkpoint was fine-tuned on: {', '.join(DATASET_ALIASES)} "
                        f"(default: {DEFAULT_DATASET})")
    p.add_argument("--out", default=None, help="the weights folder (default: weights/<variant>-<dataset>)")
    p.add_argument("--file", default=None, help="the checkpoint's path in the repository, instead of the matching "
                                                "rule (docs/model.md)")
    p.add_argument("--repo", default=HF_REPO, help=f"Hugging Face model repository (default: {HF_REPO})")
    p.add_argument("--revision", default=HF_REVISION, help="branch, tag or commit of the repository")
    p.add_argument("--env-file", default=None, help="set SSP_SAM_VARIANT and SSP_SAM_WEIGHTS_DIR in this file "
                                                    "(e.g. .env)")
    p.add_argument("--recheck", action="store_true", help="hash every file present again and ask the hub again "
                                                          "which checkpoint matches")
    p.set_defaults(func=_cli)


__all__ = ["WeightsError", "WeightsManifest", "RemoteFile", "DownloadProgress", "OFFICIAL_WEIGHTS",
           "download_weights", "read_manifest", "apply_weights_dir", "select_checkpoint", "folder_complete",
           "download_command", "read_progress", "register_cli"]
