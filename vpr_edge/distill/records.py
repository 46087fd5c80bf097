"""A run's records: metrics CSV (one row per step), evaluation CSV, PNG curves (matplotlib, Agg)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from vpr_edge.atomic import atomic_file
from vpr_edge.lazy import lazy_import

METRICS = "metrics.csv"
EVAL = "eval.csv"
CURVES = "curves.png"


class CsvLog:
    """Append-only CSV with a fixed header; `truncate_after(step)` drops rows a resumed run redoes."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def truncate_after(self, step: int) -> None:
        """Keep the header and rows with step <= `step` (written atomically)."""
        rows = [r for r in self.rows() if int(float(r["step"])) <= step]
        with atomic_file(self.path, "w") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
            fh.flush()
            os.fsync(fh.fileno())


def plot_curves(metrics: list[dict], evals: list[dict], path: Path, losses: list[str]) -> Path:
    """Training losses (log scale) and held-out metrics against the step."""
    mpl = lazy_import("matplotlib")
    mpl.use("Agg", force=True)
    plt = lazy_import("matplotlib.pyplot")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [int(float(r["step"])) for r in metrics]
    for name in ["loss"] + [f"loss_{n}" for n in losses]:
        ys = [float(r[name]) for r in metrics if r.get(name) not in (None, "")]
        if ys and len(ys) == len(steps):
            a.plot(steps, [max(y, 1e-12) for y in ys], label=name, lw=1.2 if name == "loss" else 0.8)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_title("training losses")
    a.legend(fontsize=8)
    for split, style in (("heldout", "-"), ("train", "--")):
        rows = [r for r in evals if r.get("split") == split]
        if not rows:
            continue
        xs = [int(float(r["step"])) for r in rows]
        for name in ("desc_cos_mean", "assign_agree", "top1", "map_top1"):
            ys = [float(r[name]) for r in rows if r.get(name) not in (None, "")]
            if len(ys) == len(xs):
                b.plot(xs, ys, style, marker="o", ms=3, label=f"{split} {name}")
    b.set_xlabel("step")
    b.set_title("student vs teacher")
    b.set_ylim(top=1.0)
    b.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path
