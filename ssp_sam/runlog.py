"""The files a training run writes beside its checkpoints: ``log.csv`` (per logged step), ``epochs.csv`` (per
epoch) and ``curves.png`` (loss and validation curves). Every write replaces the file atomically
(:func:`ssp_sam.io.atomic_write`), so a reader never sees half a file and a killed run leaves whole ones.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ssp_sam.io import atomic_write, write_text_atomic


class CsvLog:
    """Rows of a CSV file, appended one at a time; the header widens when a row brings new keys. A file that
    exists already (a resumed run) is continued."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.header = list(reader.fieldnames or [])
                self.rows = list(reader)

    def write(self, row: dict[str, Any]) -> None:
        self.header += [k for k in row if k not in self.header]
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.header)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(out_dir: str | Path) -> None:
    """Training loss (per logged step) and validation mIoU / oIoU / N-acc (per epoch) -> ``out_dir/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    steps, epochs = _read_csv(out_dir / "log.csv"), _read_csv(out_dir / "epochs.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if steps:
        x = [float(r["step"]) for r in steps]
        axes[0].plot(x, [float(r["total"]) for r in steps], label="total")
        for k in ("dice", "focal", "l1", "giou", "patch"):
            if any(r.get(k) for r in steps):
                axes[0].plot(x, [float(r.get(k) or "nan") for r in steps], label=k, alpha=0.6)
        axes[0].set_xlabel("step"), axes[0].set_yscale("log"), axes[0].legend(fontsize=7)
        axes[0].set_title("training loss")
    for k in ("val/mIoU", "val/oIoU", "val/N-acc"):
        pts = [(float(r["epoch"]), float(r[k])) for r in epochs if r.get(k) not in (None, "", "nan")]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=k)
    axes[1].set_xlabel("epoch"), axes[1].set_ylim(0, 1), axes[1].legend(fontsize=7), axes[1].set_title("validation")
    fig.tight_layout()
    with atomic_write(out_dir / "curves.png", "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


__all__ = ["CsvLog", "plot_curves"]
