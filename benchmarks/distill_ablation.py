"""What each distillation loss contributes: the same short run with all losses, then with each one switched off,
and each one alone, on one teacher cache; held-out metrics of every run side by side.

    python benchmarks/distill_ablation.py --cache benchmarks/results/distill_vitl/artifacts/cache-nordland \\
        --output benchmarks/results/distill_ablation [--steps 100] [--student-size 196x196]
    python benchmarks/distill_ablation.py --cache CACHE --which ranking --seeds 0,1 --output OUT \\
        --eval-teacher TEACHER --eval-map MAP --eval-images QUERIES   # the ranking loss, repeated, against a map

--which ranking runs 'all', 'all' plus the ranking loss (weight --ranking-weight) and 'all' without the
assignment loss; --seeds repeats every run with other seeds (initialisation and data order; runs of seed s > 0
are named NAME-sS). With --eval-map, one `vpr-edge distill eval` of every run against that teacher-built map
adds the product's own top-1 agreement (student queries vs teacher queries) to the table.

Every run is one `vpr-edge distill train` (its TrainConfig written as JSON next to it, the command and wall
time appended to commands.txt); a finished run is skipped and a killed one resumes, so the script continues
where it stopped. The runs share everything but the loss weights ('all': patch 1, vlad 1, descriptor 1,
relational 0.1, assignment 0.1, the defaults until these runs switched the assignment loss off by default;
the runs keep that set as their reference so they stay comparable): seed, data order, steps, learning rate,
held-out split (the
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from report import finish, pyplot  # noqa: E402
from vpr_edge.atomic import write_json  # noqa: E402
BIN = Path(sys.executable).parent
DEFAULT = {"patch": 1.0, "vlad": 1.0, "descriptor": 1.0, "relational": 0.1, "assignment": 0.1, "ranking": 0.0}
METRICS = ("desc_cos_mean", "desc_cos_min", "assign_agree", "patch_cos", "top1", "map_top1")


def variants(which: str, ranking: float = 1.0) -> dict[str, dict[str, float]]:
    out = {"all": dict(DEFAULT)}
    if which == "ranking":
        return out | {"ranking": {**DEFAULT, "ranking": ranking}, "no-assignment": {**DEFAULT, "assignment": 0.0}}
    if which in ("off", "both"):
        out |= {f"no-{n}": {**DEFAULT, n: 0.0} for n in DEFAULT if DEFAULT[n]}
    if which in ("alone", "both"):
        out |= {f"only-{n}": {k: (v if k == n else 0.0) for k, v in DEFAULT.items()} for n in DEFAULT if DEFAULT[n]}
    return out


def run_name(variant: str, seed: int) -> str:
    """Runs of seed 0 keep the variant's name (the first ablation's folders); seed s > 0 adds -sS."""
    return variant + (f"-s{seed}" if seed else "")


def last_eval(run: Path) -> dict[str, dict[str, float]]:
    with (run / "eval.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = max(int(r["step"]) for r in rows)
    return {r["split"]: {m: float(r.get(m) or "nan") for m in METRICS} | {"step": last, "items": int(r["items"])}
            for r in rows if int(r["step"]) == last}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student-size", default=None, metavar="HxW")
    ap.add_argument("--which", choices=("off", "alone", "both", "ranking"), default="off",
                    help="runs beside 'all': each loss switched off (default), each alone, both, or the ranking set")
    ap.add_argument("--ranking-weight", type=float, default=1.0, help="the ranking loss's weight in --which ranking")
    ap.add_argument("--only", default=None, metavar="NAME,...", help="run only these variants of --which ('all' among them)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every run once per seed (default 0)")
    ap.add_argument("--eval-teacher", type=Path, default=None, help="teacher artifact for --eval-map")
    ap.add_argument("--eval-map", type=Path, default=None, help="a map built with the teacher (held-out images)")
    ap.add_argument("--eval-images", type=Path, default=None, help="held-out query images for --eval-map")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if (args.eval_map is None) != (args.eval_images is None) or (args.eval_map is None) != (args.eval_teacher is None):
        ap.error("--eval-map, --eval-images and --eval-teacher go together")
    seeds = [int(x) for x in args.seeds.split(",")]
    chosen = variants(args.which, args.ranking_weight)
    if args.only:
        names = args.only.split(",")
        if "all" not in names or not set(names) <= set(chosen):
            ap.error(f"--only takes 'all' and some of {', '.join(chosen)}")
        chosen = {n: w for n, w in chosen.items() if n in names}
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.txt"
    results, wall = {}, {}
    plan = [(run_name(name, seed), weights, seed)
            for seed in seeds for name, weights in chosen.items()]
    for name, weights, seed in plan:
        run = out / "artifacts" / f"run-{name}"
        cfg = out / f"config-{name}.json"
        cfg.write_text(json.dumps({"losses": weights, "seed": seed}, indent=2) + "\n")
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
        results[name] = {"losses": weights, "seed": seed, **last_eval(run)}
        print(name, results[name].get("heldout"), flush=True)
    if args.eval_map is not None:
        map_eval(args, out, log, results, wall)
    res = {"command": "python benchmarks/distill_ablation.py " + " ".join(sys.argv[1:]), "cache": str(args.cache),
           "teacher": json.loads((args.cache / "manifest.json").read_text()).get("identity"),
           "steps": args.steps, "batch_size": args.batch_size, "seeds": seeds, "runs": results, "wall_s": wall}
    write_json(out / "results.json", res)
    md = ["# What each distillation loss contributes (held-out views; random-weight teacher)", "",
          f"Command: `{res['command']}`. Teacher: {res['teacher']}. Every run: {args.steps} steps of {args.batch_size} "
          "views; runs of one seed share initialisation, data order and the held-out split (the cache's last 5% of "
          "images, view 0); metrics at the last step. 'self top-1': the student's descriptor finds its own item's "
          "teacher descriptor among the held-out ones; 'map top-1 (cache)': against the other held-out items' "
          "teacher descriptors, the student's nearest is the teacher's nearest"
          + ("; 'map top-1 (eval)': `vpr-edge distill eval`'s top-1 agreement against the teacher-built map "
             f"{args.eval_map.name} ({args.eval_images.name} queries)" if args.eval_map else "") + ".", "",
          "| run | seed | losses (" + ", ".join(DEFAULT) + ") | held-out cos mean (vs all) | cos min | assignment agreement "
          "| patch cos | self top-1 | map top-1 (cache) | map top-1 (eval) | train cos mean |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h, t = r["heldout"], r.get("train", {})
        base = results[run_name("all", r["seed"])]["heldout"]
        w = ", ".join(f"{r['losses'][k]:g}" for k in DEFAULT)
        md.append(f"| {name} | {r['seed']} | {w} | {h['desc_cos_mean']:.4f} ({h['desc_cos_mean'] - base['desc_cos_mean']:+.4f}) "
                  f"| {h['desc_cos_min']:.4f} | {h['assign_agree']:.4f} | {h['patch_cos']:.4f} | {h['top1']:.3f} | "
                  f"{h['map_top1']:.3f} | {r.get('eval', {}).get('top1_agreement', float('nan')):.3f} | "
                  f"{t.get('desc_cos_mean', float('nan')):.4f} |")
    if len(seeds) > 1:
        md += ["", f"Means over seeds {', '.join(map(str, seeds))}:", "",
               "| variant | held-out cos mean | map top-1 (cache) | map top-1 (eval) |", "|---|---|---|---|"]
        for v in chosen:
            rs = [results[run_name(v, x)] for x in seeds]
            md.append(f"| {v} | {np.mean([r['heldout']['desc_cos_mean'] for r in rs]):.4f} | "
                      f"{np.mean([r['heldout']['map_top1'] for r in rs]):.3f} | "
                      f"{np.mean([r.get('eval', {}).get('top1_agreement', float('nan')) for r in rs]):.3f} |")
    return finish(out, md, _plot, results)


def map_eval(args, out: Path, log: Path, results: dict, wall: dict) -> None:
    """One `vpr-edge distill eval` of every run against the teacher-built map; its per-student metrics join results."""
    dest = out / "eval-map"
    runs = [out / "artifacts" / f"run-{name}" for name in results]
    if not (dest / "eval.json").exists():
        cmd = [str(BIN / "vpr-edge"), "distill", "eval", *map(str, runs), "--teacher", str(args.eval_teacher.resolve()),
               "--map", str(args.eval_map.resolve()), "--images", str(args.eval_images.resolve()), "--latency-runs", "1",
               "--threads", str(args.threads), "--quiet", "--output", str(dest)]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall["eval"] = time.perf_counter() - t0
        with log.open("a") as fh:
            fh.write(f"# {wall['eval']:.0f} s\n{' '.join(cmd)}\n")
    ev = json.loads((dest / "eval.json").read_text())["results"]
    for name, run in zip(results, runs):
        r = next(v for k, v in ev.items() if k != "teacher" and Path(v["run"]).resolve() == run.resolve())
        results[name]["eval"] = {k: r[k] for k in ("cos_mean", "cos_min", "top1_agreement", "top5_agreement",
                                                   "assignment_agreement") if k in r}


def _plot(out: Path, results: dict) -> None:
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.6))
    x = range(len(names))
    for i, (m, label) in enumerate((("desc_cos_mean", "descriptor cos"), ("assign_agree", "assignment agreement"),
                                    ("top1", "self top-1"), ("map_top1", "map top-1 (cache)"))):
        ax.bar([k + (i - 2) * 0.16 for k in x], [results[n]["heldout"][m] for n in names], 0.16, label=label)
    ax.set_xticks(list(x), names, fontsize=8, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out, last step")
    ax.legend(fontsize=7, ncol=5, loc="lower center")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
