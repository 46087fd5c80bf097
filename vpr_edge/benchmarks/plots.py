"""PNG plots of a dataset benchmark (matplotlib, Agg backend, imported only here: extra 'bench')."""

from __future__ import annotations

from pathlib import Path

from vpr_edge.atomic import atomic_file
from vpr_edge.lazy import lazy_import

LATENCY_VS_RECALL = "latency_vs_recall.png"
RECALL_AT_K = "recall_at_k.png"
LATENCY_BREAKDOWN = "latency_breakdown.png"


def _pyplot():
    mpl = lazy_import("matplotlib")
    mpl.use("Agg", force=True)  # files only: never a display, also on a headless robot
    return lazy_import("matplotlib.pyplot")


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")


def latency_vs_recall(res: dict, path: Path, batch: str = "1") -> Path:
    """One point per variant: p50 latency per image at `batch` against recall@1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = []
    for i, (name, r) in enumerate(res["variants"].items()):
        lat = r["latency"].get(batch) or next(iter(r["latency"].values()))
        x, y = lat["per_image_ms"]["p50"], 100.0 * r["accuracy"]["R@1"]
        xs.append(x)
        ax.scatter([x], [y], s=40)
        # variants often share a recall: stagger the labels so they stay readable
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4 + 11 * (i % 4)), fontsize=8)
    log = len(xs) > 1 and max(xs) / max(min(xs), 1e-9) > 20
    if log:  # FP32 eager vs INT8 engines easily span two decades
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(lazy_import("matplotlib.ticker").ScalarFormatter())
    ax.set_xlabel(f"p50 latency per image at batch {batch} (ms{', log scale' if log else ''})")
    ax.set_ylabel("recall@1 (%)")
    ax.set_title(f"{res['dataset']['name']}: latency vs recall@1")
    ax.grid(True, alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def recall_curves(res: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in res["variants"].items():
        ks = [int(k.split("@")[1]) for k in r["accuracy"]]
        ax.plot(ks, [100.0 * v for v in r["accuracy"].values()], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_title(f"{res['dataset']['name']}: recall@k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return path


def latency_breakdown(res: dict, path: Path, batch: str = "1") -> Path:
    """Stacked median ms per image: preprocess, backbone, aggregation, search, other."""
    plt = _pyplot()
    names = list(res["variants"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4.2))
    bottom = [0.0] * len(names)
    for stage in ("preprocess", "backbone", "aggregation", "search", "other"):
        vals = []
        for n in names:
            r = res["variants"][n]
            lat = r["latency"].get(batch) or next(iter(r["latency"].values()))
            vals.append(r["search"]["per_query_ms"]["p50"] if stage == "search" else lat["stages_ms_per_image"][stage])
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel(f"ms per image at batch {batch}")
    ax.set_title("where the time goes")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=30)
    _save(fig, path)
    plt.close(fig)
    return path


def write_dataset_plots(res: dict, folder: Path) -> list[Path]:
    folder = Path(folder)
    return [
        latency_vs_recall(res, folder / LATENCY_VS_RECALL),
        recall_curves(res, folder / RECALL_AT_K),
        latency_breakdown(res, folder / LATENCY_BREAKDOWN),
    ]
