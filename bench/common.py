"""What every benchmark writes beside its numbers: the machine, the date and the command, and paths that mean
something on another machine (repository-relative, or ``<tmp>/...`` for temporary folders; never a home folder)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The processor's model name (Linux reports it in /proc/cpuinfo; ``platform.processor()`` is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import numpy
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(), "numpy": numpy.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def portable(value: Any) -> Any:
    """``value`` (JSON-like) with every absolute path made portable: relative to the repository, ``<tmp>/...``
    under the temporary folder, ``<path>/<name>`` anywhere else."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        for base, shown in ((ROOT, None), (Path(tempfile.gettempdir()), "<tmp>")):
            try:
                rel = path.resolve().relative_to(base.resolve())
            except ValueError:
                continue
            return str(rel) if shown is None else f"{shown}/{rel}"
        return f"<path>/{path.name}"
    return value


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a CI job's end) into SystemExit, so that ``finally`` blocks and ``with`` blocks run
    and the servers a benchmark started are stopped with it."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def provenance() -> dict:
    """The machine, the date and the command of this run."""
    return {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(portable([sys.executable.rsplit("/", 1)[-1], *sys.argv]))}


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (as the benches' --size / --sizes take it) -> (width, height)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """``result`` with its provenance, paths made portable, written atomically."""
    from ssp_sam.io import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(portable({**provenance(), **result}), indent=2, default=str))
    return path
