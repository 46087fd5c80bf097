"""A ViT-S/14 student of the ViT-G/14 AnyLoc teacher, end to end on this machine (random weights).

    python benchmarks/distill_vitg.py --output benchmarks/results/distill_vitg [--steps 400] [--images 320]
    python benchmarks/distill_vitg.py --preset anyloc-dinov2-vitl14 --student-size 196x196 --images 1000 \
        --spaced-heldout --map-init generic --output benchmarks/results/distill_vitl   # a smaller teacher, longer run

--preset picks a smaller AnyLoc teacher of the same family where the CPU cannot afford a long ViT-G run
(the teacher cache is the teacher's cost; the student's training costs the same whatever the teacher);
--student-size gives the student its own input (its token grid is aligned to the teacher's bilinearly);
--stop-after ends after a stage (a later call continues: finished steps are skipped).

Every step is a `vpr-edge` / `vpr-export` command (written to commands.txt with its wall time) and is
skipped when its output exists, so a killed run continues where it stopped:

 1. teacher: anyloc-dinov2 (ViT-G/14 block 31 value, VLAD 32, vocabulary fitted on Corridor images outside
    its verify set), backbone scope, FP32 ONNX, random weights;
 2. teacher cache: the teacher through the lean runtime (ONNX Runtime) on --images Nordland frames evenly
    spaced over the first 85% of the route, 2 views each (view 0 plain, view 1 augmented);
 3. maps built with the teacher: Corridor database (keeping the teacher features, for the map-specific
    student) and a held-out Nordland stretch (the last 120 frames: even ones the map, odd ones the queries);
 4. students: generic (ViT-S/14 from random init, on the Nordland cache), map-specific (on the Corridor map's
    own features);
 5. `distill eval`: Corridor queries against the teacher's Corridor map (both students), held-out Nordland
    queries against the teacher's Nordland map (generic student);
 6. student artifacts FP32 and INT8 (calibrated on the Nordland training frames) and `bench` of teacher FP32
    vs student FP32 / INT8 on Corridor in one run (latency ratios, fidelity).
Writes results.json, results.md and summary.png (plus each step's own outputs) into --output; the big
artifacts go to --output/artifacts (kept out of git except their manifests).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORRIDOR = REPO.parent / "shared" / "data" / "corridor"
NORDLAND = REPO.parent / "shared" / "data" / "nordland-summer"
BIN = Path(sys.executable).parent


def run(cmd: list[str], log: Path, done: Path | None = None) -> float:
    """Run a command unless `done` exists; append it and its wall time to `log`."""
    if done is not None and done.exists():
        print(f"skip (done): {' '.join(cmd)}", flush=True)
        return 0.0
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    dt = time.perf_counter() - t0
    with log.open("a") as fh:
        fh.write(f"# {dt:.0f} s\n{' '.join(cmd)}\n")
    return dt


STAGES = ("teacher", "cache", "maps", "train-generic", "eval")


def link_images(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = folder / f.name
        if not dst.exists():
            dst.symlink_to(f)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--images", type=int, default=320, help="Nordland training frames (default 320)")
    ap.add_argument("--steps", type=int, default=400, help="generic student optimizer steps (default 400)")
    ap.add_argument("--map-steps", type=int, default=150, help="map-specific student steps (default 150)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bench-runs", type=int, default=5, help="timed runs per variant in the final bench (default 5)")
    ap.add_argument("--bench-limit", type=int, default=16, help="Corridor images in the final bench (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="anyloc-dinov2", help="the teacher preset (default the ViT-G/14 one)")
    ap.add_argument("--views", type=int, default=2, help="cached views per training frame (default 2)")
    ap.add_argument("--student-size", default=None, metavar="HxW",
                    help="student input size (default: the teacher's; e.g. 196x196 for a 14x14 token grid)")
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--spaced-heldout", action="store_true",
                    help="also evaluate on held-out Nordland frames with an unambiguous nearest map frame")
    ap.add_argument("--map-init", choices=("random", "generic"), default="random",
                    help="the map-specific student starts from random weights or from the generic student")
    ap.add_argument("--map-lr", type=float, default=3e-4, help="its peak learning rate with --map-init generic")
    ap.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage (resume later)")
    args = ap.parse_args()
    out = args.output.resolve()
    work = out / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    log = out / "commands.txt"
    vpr, export = str(BIN / "vpr-edge"), str(BIN / "vpr-export")
    th = ["--threads", str(args.threads)]
    times: dict[str, float] = {}

    frames = sorted(NORDLAND.glob("images-*.png"))
    cut = int(len(frames) * 0.85)
    step = max(1, cut // args.images)
    train_frames = frames[:cut:step][: args.images]
    held = frames[-120:]
    nl_train = link_images(train_frames, work / "nordland-train")
    nl_db = link_images(held[0::2], work / "nordland-heldout-db")
    nl_q = link_images(held[1::2], work / "nordland-heldout-queries")
    # Held out with one clear nearest place: consecutive frames are near-duplicates, so a query between
    # two map frames at equal distance (the interleaved split above) is a tie by construction. Here the
    # map is every 8th frame of the route's last 15% and each query lies 3 frames after a map frame
    # (5 before the next): the nearest map frame is unambiguous along the route.
    tail = frames[cut:]
    nl_sdb = link_images(tail[0::8], work / "nordland-spaced-db")
    nl_sq = link_images(tail[3::8], work / "nordland-spaced-queries")

    teacher = work / "teacher-fp32"
    times["teacher export"] = run([export, "--model", args.preset, "--weights", "random", "--scope", "backbone",
                                   "--verify", str(CORRIDOR), "--verify-limit", "16", "--quiet", "--output", str(teacher)],
                                  log, teacher / "manifest.json")
    if args.stop_after == "teacher":
        return 0
    cache = work / "cache-nordland"
    times["teacher cache"] = run([vpr, "distill", "cache", str(nl_train), "--teacher", str(teacher), "--output",
                                  str(cache), "--views", str(args.views), "--batch", "4", "--shard-size", "32", *th],
                                 log, cache / "manifest.json")
    if args.stop_after == "cache":
        return 0
    cmap = work / "map-corridor"
    times["corridor map (+ features)"] = run([vpr, "map", "build", str(CORRIDOR / "database"), "--model", str(teacher),
                                              "-o", str(cmap), "--keep-teacher-features", "--batch", "4", *th],
                                             log, cmap / "index.faiss")
    nmap = work / "map-nordland-heldout"
    times["nordland map"] = run([vpr, "map", "build", str(nl_db), "--model", str(teacher), "-o", str(nmap),
                                 "--batch", "4", *th], log, nmap / "index.faiss")
    smap = work / "map-nordland-spaced"
    if args.spaced_heldout:
        times["nordland spaced map"] = run([vpr, "map", "build", str(nl_sdb), "--model", str(teacher), "-o", str(smap),
                                            "--batch", "4", *th], log, smap / "index.faiss")
    if args.stop_after == "maps":
        return 0
    common = ["--batch-size", str(args.batch_size), "--micro-batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", str(args.warmup_steps), "--checkpoint-every", "25", "--ema-decay", "0.99", *th, "--quiet"]
    if args.student_size:
        common += ["--student-size", args.student_size]
    generic = work / "run-generic"
    times["train generic"] = run([vpr, "distill", "train", "--cache", str(cache), "--output", str(generic),
                                  "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--heldout-fraction", "0.05", *common]
                                 + (["--resume"] if (generic / "config.json").exists() else []),
                                 log, generic / "student.pt")
    if args.stop_after == "train-generic":
        return 0
    mapstudent = work / "run-map-specific"
    # map-specific: from random init, or fine-tuned from the generic student (--map-init generic)
    tune = ["--student-weights", str(generic), "--lr", str(args.map_lr), "--warmup-steps", "10"] \
        if args.map_init == "generic" else []
    times["train map-specific"] = run([vpr, "distill", "train", "--cache", str(cmap), "--output", str(mapstudent),
                                       "--steps", str(args.map_steps), "--eval-every", "50", "--heldout-fraction", "0.1",
                                       *common, *tune] + (["--resume"] if (mapstudent / "config.json").exists() else []),
                                      log, mapstudent / "student.pt")
    ev_c, ev_n = out / "eval-corridor", out / "eval-nordland"
    times["eval corridor"] = run([vpr, "distill", "eval", str(generic), str(mapstudent), "--teacher", str(teacher),
                                  "--map", str(cmap), "--images", str(CORRIDOR), "--latency-runs", "5", *th, "--quiet",
                                  "--output", str(ev_c)], log, ev_c / "eval.json")
    times["eval nordland"] = run([vpr, "distill", "eval", str(generic), "--teacher", str(teacher), "--map", str(nmap),
                                  "--images", str(nl_q), "--latency-runs", "5", *th, "--quiet", "--output", str(ev_n)],
                                 log, ev_n / "eval.json")
    if args.spaced_heldout:
        ev_s = out / "eval-nordland-spaced"
        times["eval nordland spaced"] = run([vpr, "distill", "eval", str(generic), "--teacher", str(teacher), "--map",
                                             str(smap), "--images", str(nl_sq), "--latency-runs", "3", *th, "--quiet",
                                             "--output", str(ev_s)], log, ev_s / "eval.json")
    if args.stop_after == "eval":
        return 0
    s32, s8 = work / "student-fp32", work / "student-int8"
    times["student fp32 export"] = run([export, "--model", f"student:{generic}", "--verify", str(CORRIDOR),
                                        "--verify-limit", "32", "--quiet", "--output", str(s32)], log, s32 / "manifest.json")
    times["student int8 export"] = run([export, "--model", f"student:{generic}", "--precision", "int8", "--verify",
                                        str(CORRIDOR), "--verify-limit", "32", "--calibration", str(nl_train),
                                        "--calibration-limit", "128", "--accept-fidelity", "--quiet", "--output", str(s8)],
                                       log, s8 / "manifest.json")
    bench = out / "bench"
    times["bench"] = run([vpr, "bench", str(CORRIDOR), "--variant", f"teacher-fp32={teacher}", "--variant",
                          f"student-fp32={s32}", "--variant", f"student-int8={s8}", "--baseline", "teacher-fp32",
                          "--batches", "1", "--runs", str(args.bench_runs), "--warmup", "1", "--limit", str(args.bench_limit),
                          "--match-grid", "2",
                          *th, "--quiet", "--output", str(bench)], log, bench / "results.json")
    summarize(out, work, times, args)
    return 0


def summarize(out: Path, work: Path, times: dict, args) -> None:
    ec = json.loads((out / "eval-corridor" / "eval.json").read_text())
    en = json.loads((out / "eval-nordland" / "eval.json").read_text())
    b = json.loads((out / "bench" / "results.json").read_text())
    gname = next(n for n in ec["students"] if n.endswith("run-generic"))
    mname = next(n for n in ec["students"] if n.endswith("run-map-specific"))
    g, ms, gn = ec["results"][gname], ec["results"][mname], en["results"][gname]
    t = ec["results"]["teacher"]
    es_path = out / "eval-nordland-spaced" / "eval.json"
    es = json.loads(es_path.read_text()) if es_path.exists() else None
    gs = es["results"][gname] if es else None
    # A smaller teacher's run still answers the ViT-G FLOPs question: ViT-G/14's count from its own distill eval
    # (the same counter, benchmarks/results/distill_vitg), over this run's student.
    vitg_eval = REPO / "benchmarks" / "results" / "distill_vitg" / "eval-corridor" / "eval.json"
    vitg_gflops = t["gflops"] if args.preset == "anyloc-dinov2" else (
        json.loads(vitg_eval.read_text())["results"]["teacher"]["gflops"] if vitg_eval.exists() else None)
    lat = {n: v["latency"]["1"]["per_image_ms"]["p50"] for n, v in b["variants"].items()}
    fid = {n: v.get("fidelity") or {} for n, v in b["variants"].items()}
    s32 = json.loads((work / "student-fp32" / "manifest.json").read_text())
    s8 = json.loads((work / "student-int8" / "manifest.json").read_text())
    res = {
        "command": "python benchmarks/distill_vitg.py " + " ".join(sys.argv[1:]),
        "machine": b["machine"],
        "teacher": {"preset": args.preset, "gflops": t["gflops"], "params_m": t["params_m"],
                    "pytorch_ms_b1": t["latency_ms_p50"], "corridor_R@1": t.get("R@1"), "corridor_R@5": t.get("R@5")},
        "students": {
            "generic": {"corridor": g, "nordland_heldout": gn, "nordland_spaced": gs},
            "map_specific": {"corridor": ms},
        },
        "latency_ms_b1_ort": lat,
        "latency_ratio_teacher_over": {n: lat["teacher-fp32"] / v for n, v in lat.items()},
        "bench_fidelity_vs_teacher": {n: {k: f.get(k) for k in ("cos_mean", "top1_agreement", "top5_agreement")}
                                      for n, f in fid.items() if f},
        "student_gates": {"fp32": s32["verification"]["fp32"]["passed"], "int8": s8["verification"]["int8"]["passed"],
                          "int8_report": {k: s8["verification"]["int8"]["report"].get(k) for k in ("cos_mean", "top1_agreement")}},
        "vitg_gflops": vitg_gflops,
        "targets": {
            "flops_ratio_ge_50": {"value": g["flops_ratio_teacher_over_student"], "met": g["flops_ratio_teacher_over_student"] >= 50},
            **({"flops_ratio_vitg_over_student_ge_50": {"value": vitg_gflops / g["gflops"], "met": vitg_gflops / g["gflops"] >= 50}}
               if vitg_gflops and args.preset != "anyloc-dinov2" else {}),
            "cos_mean_ge_0.9_corridor": {"value": g["cos_mean"], "met": g["cos_mean"] >= 0.9},
            "cos_mean_ge_0.9_nordland": {"value": gn["cos_mean"], "met": gn["cos_mean"] >= 0.9},
            "top1_agreement_ge_0.8_corridor": {"value": g["top1_agreement"], "met": g["top1_agreement"] >= 0.8},
            "top1_agreement_ge_0.8_nordland": {"value": gn["top1_agreement"], "met": gn["top1_agreement"] >= 0.8},
            "cos_mean_ge_0.9_corridor_map_specific": {"value": ms["cos_mean"], "met": ms["cos_mean"] >= 0.9},
            "top1_agreement_ge_0.8_corridor_map_specific": {"value": ms["top1_agreement"], "met": ms["top1_agreement"] >= 0.8},
            **({"cos_mean_ge_0.9_nordland_spaced": {"value": gs["cos_mean"], "met": gs["cos_mean"] >= 0.9},
                "top1_agreement_ge_0.8_nordland_spaced": {"value": gs["top1_agreement"], "met": gs["top1_agreement"] >= 0.8}}
               if gs else {}),
        },
        "wall_s": times,
        "config": vars(args) | {"output": str(args.output)},
    }
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = [f"# ViT-S/14 students of the {args.preset} teacher (random weights)", "",
          f"Command: `{res['command']}`; CPU: {b['machine'].get('cpu')} ({', '.join(b['machine'].get('cpu_features', []))}), "
          f"{b['machine'].get('cores_logical')} cores, {args.threads} threads.", "",
          "| student | held-out images | cos mean / min | top-1 / top-5 agreement | assignment agreement | R@1 (teacher) | GFLOPs (teacher) |",
          "|---|---|---|---|---|---|---|"]
    for label, r, where in (("generic", g, "Corridor queries vs teacher Corridor map"),
                            ("map-specific", ms, "Corridor queries vs teacher Corridor map"),
                            ("generic", gn, "held-out Nordland vs teacher Nordland map"),
                            *((("generic", gs, "held-out Nordland, spaced: one clear nearest map frame"),) if gs else ())):
        tr = (es if "spaced" in where else en if "Nordland" in where else ec)["results"]["teacher"]
        md.append(f"| {label} | {where} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['top1_agreement']:.3f} / "
                  f"{r['top5_agreement']:.3f} | {r.get('assignment_agreement', float('nan')):.3f} | "
                  f"{r.get('R@1', float('nan')):.3f} ({tr.get('R@1', float('nan')):.3f}) | {r['gflops']:.2f} ({tr['gflops']:.1f}) |")
    md += ["", "ONNX Runtime, batch 1, same run (`bench`): " + ", ".join(
        f"{n} {v:.1f} ms ({res['latency_ratio_teacher_over'][n]:.1f}x faster than the teacher)" for n, v in lat.items()), "",
        "Targets: " + "; ".join(f"{k} {v['value']:.3f}: {'met' if v['met'] else 'NOT met'}" for k, v in res["targets"].items()),
        "", "Wall time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items() if v)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(out, res, lat)
    for src, dst in ((work / "run-generic" / "curves.png", out / "curves-generic.png"),
                     (work / "run-map-specific" / "curves.png", out / "curves-map-specific.png")):
        if src.exists():
            shutil.copyfile(src, dst)
    print("\n".join(md))


def _plot(out: Path, res: dict, lat: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    s = res["students"]
    names = ["generic / Corridor", "map-specific / Corridor", "generic / Nordland"]
    rows = [s["generic"]["corridor"], s["map_specific"]["corridor"], s["generic"]["nordland_heldout"]]
    if s["generic"].get("nordland_spaced"):
        names.append("generic / Nordland spaced")
        rows.append(s["generic"]["nordland_spaced"])
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["cos_mean"] for r in rows], 0.4, label="cos mean")
    axes[0].bar([i + 0.2 for i in x], [r["top1_agreement"] for r in rows], 0.4, label="top-1 agreement")
    axes[0].axhline(0.9, color="gray", ls=":")
    axes[0].axhline(0.8, color="gray", ls="--")
    axes[0].set_xticks(list(x), names, fontsize=7)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"student vs {res['teacher']['preset']} teacher")
    axes[1].bar(list(lat), list(lat.values()))
    axes[1].set_ylabel("ms per image, batch 1 (ONNX Runtime)")
    axes[1].set_yscale("log")
    axes[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
