"""What each distillation loss contributes: the same short run with all losses, then with each one switched off,
and each one alone, on one teacher cache; held-out metrics of every run side by side.

    python benchmarks/distill_ablation.py --cache benchmarks/results/distill_vitl/artifacts/cache-nordland \\
        --output benchmarks/results/distill_ablation [--steps 100] [--student-size 196x196]

Every run is one `vpr-edge distill train` (its TrainConfig written as JSON next to it, the command and wall
time appended to commands.txt); a finished run is skipped and a killed one resumes, so the script continues
where it stopped. The runs share everything but the loss weights (README's defaults: patch 1, vlad 1,
descriptor 1, relational 0.1, assignment 0.1): seed, data order, steps, learning rate, held-out split (the
cache's last 5% of images, view 0). Reported per run, at its last step, from its eval.csv: held-out descriptor
cosine (mean and min), assignment agreement, patch cosine and top-1 of student descriptors among the held-out
teacher descriptors; plus the same on the training subset. Writes results.json, results.md, ablation.png.
Random-weight teachers: what each loss does to matching a random teacher, not to a trained one.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from report import finish, pyplot  # noqa: E402
from vpr_edge.atomic import write_json  # noqa: E402
BIN = Path(sys.executable).parent
DEFAULT = {"patch": 1.0, "vlad": 1.0, "descriptor": 1.0, "relational": 0.1, "assignment": 0.1}
METRICS = ("desc_cos_mean", "desc_cos_min", "assign_agree", "patch_cos", "top1")


def variants(which: str) -> dict[str, dict[str, float]]:
    out = {"all": dict(DEFAULT)}
    if which in ("off", "both"):
        out |= {f"no-{n}": {**DEFAULT, n: 0.0} for n in DEFAULT}
    if which in ("alone", "both"):
        out |= {f"only-{n}": {k: (v if k == n else 0.0) for k, v in DEFAULT.items()} for n in DEFAULT}
    return out


def last_eval(run: Path) -> dict[str, dict[str, float]]:
    with (run / "eval.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = max(int(r["step"]) for r in rows)
    return {r["split"]: {m: float(r[m]) for m in METRICS} | {"step": last, "items": int(r["items"])}
            for r in rows if int(r["step"]) == last}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student-size", default=None, metavar="HxW")
    ap.add_argument("--which", choices=("off", "alone", "both"), default="off",
                    help="runs beside 'all': each loss switched off (default), each alone, or both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.txt"
    results, wall = {}, {}
    for name, weights in variants(args.which).items():
        run = out / "artifacts" / f"run-{name}"
        cfg = out / f"config-{name}.json"
        cfg.write_text(json.dumps({"losses": weights, "seed": 0}, indent=2) + "\n")
        if not (run / "student.pt").exists():
            cmd = [str(BIN / "vpr-edge"), "distill", "train", "--cache", str(args.cache.resolve()), "--output", str(run),
                   "--config", str(cfg), "--steps", str(args.steps), "--eval-every", str(args.steps),
                   "--heldout-fraction", "0.05", "--batch-size", str(args.batch_size), "--micro-batch-size", "8",
                   "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 10)), "--checkpoint-every", "25",
                   "--ema-decay", "0.99", "--threads", str(args.threads), "--quiet"]
            if args.student_size:
                cmd += ["--student-size", args.student_size]
            if (run / "config.json").exists():
                cmd.append("--resume")
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall[name] = time.perf_counter() - t0
            with log.open("a") as fh:
                fh.write(f"# {wall[name]:.0f} s\n{' '.join(cmd)}\n")
        results[name] = {"losses": weights, **last_eval(run)}
        print(name, results[name].get("heldout"), flush=True)
    res = {"command": "python benchmarks/distill_ablation.py " + " ".join(sys.argv[1:]), "cache": str(args.cache),
           "teacher": json.loads((args.cache / "manifest.json").read_text()).get("identity"),
           "steps": args.steps, "batch_size": args.batch_size, "runs": results, "wall_s": wall}
    write_json(out / "results.json", res)
    base = results["all"]["heldout"]
    md = ["# What each distillation loss contributes (held-out views; random-weight teacher)", "",
          f"Command: `{res['command']}`. Teacher: {res['teacher']}. Every run: {args.steps} steps of {args.batch_size} "
          "views, same seed, data order and held-out split; metrics at the last step.", "",
          "| run | losses (patch, vlad, descriptor, relational, assignment) | held-out cos mean (vs all) | cos min | "
          "assignment agreement | patch cos | top-1 | train cos mean |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h, t = r["heldout"], r.get("train", {})
        w = ", ".join(f"{r['losses'][k]:g}" for k in DEFAULT)
        md.append(f"| {name} | {w} | {h['desc_cos_mean']:.4f} ({h['desc_cos_mean'] - base['desc_cos_mean']:+.4f}) | "
                  f"{h['desc_cos_min']:.4f} | {h['assign_agree']:.4f} | {h['patch_cos']:.4f} | {h['top1']:.3f} | "
                  f"{t.get('desc_cos_mean', float('nan')):.4f} |")
    return finish(out, md, _plot, results)


def _plot(out: Path, results: dict) -> None:
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.6))
    x = range(len(names))
    for i, (m, label) in enumerate((("desc_cos_mean", "descriptor cos"), ("assign_agree", "assignment agreement"),
                                    ("patch_cos", "patch cos"), ("top1", "top-1"))):
        ax.bar([k + (i - 1.5) * 0.2 for k in x], [results[n]["heldout"][m] for n in names], 0.2, label=label)
    ax.set_xticks(list(x), names, fontsize=8, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out, last step")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
