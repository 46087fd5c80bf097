"""`vpr-edge distill eval`: students against their teacher on held-out images, side by side.

Per student (and the teacher where it applies), on the held-out query images:
- descriptor cosine student vs teacher (mean, min) and a histogram;
- patch cluster-assignment agreement (VLAD teachers): the share of patches the student's features put in
  the teacher's cluster (cosine argmax against the teacher's centres, as hard VLAD does);
- retrieval against the teacher's database: the map built with the teacher (`--map`), or else the
  teacher's descriptors of the dataset's database images. Top-1 / top-5 agreement: the student query's
  top-k list equals the teacher query's (`fidelity.compare_descriptors` definitions); recall@1/5 of both
  where the dataset has ground truth;
- how close the teacher's own choice is: its top-1 margin (similarity of its top-1 database item minus its
  top-2's) per query, and each student's top-1 agreement on the queries whose teacher margin lies in the upper
  and in the lower half (random-weight teachers score many database items nearly alike: a small descriptor
  error flips a near-tied top-1 without the student being worse elsewhere);
- parameters and GFLOPs per image (torch.utils.flop_counter, counted on one forward pass, not by hand)
  and PyTorch eager latency at batch 1, of the student and of the teacher's PyTorch reference.
Writes eval.json, eval.md, recall.png, cosine.png and one match grid per model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from vpr_edge import datasets, fidelity
from vpr_edge.atomic import atomic_dir, atomic_file
from vpr_edge.errors import ArtifactError, ConfigError
from vpr_edge.measure import percentiles

KS = (1, 5)


def _torch_stats(module, image_size: tuple[int, int], runs: int) -> dict[str, float]:
    """Parameters, GFLOPs of one image (torch's FlopCounterMode) and batch-1 latency (p50 ms)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, *image_size)
    params = sum(p.numel() for p in module.parameters())
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            module(x)
        flops = counter.get_total_flops()
        module(x)  # warm-up
        times = []
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            module(x)
            times.append(1e3 * (time.perf_counter() - t0))
    return {"params_m": params / 1e6, "gflops": flops / 1e9, "latency_ms_p50": percentiles(times)["p50"]}


def _assign(features: np.ndarray, centers: np.ndarray) -> np.ndarray:
    x = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    c = centers / np.maximum(np.linalg.norm(centers, axis=-1, keepdims=True), 1e-12)
    return np.argmax(x @ c.T, axis=-1)


def _student_outputs(run: Path, paths: list[Path], batch: int = 8):
    """(student, features, descriptors) of the images, preprocessed at the student's own input size."""
    import torch

    from vpr_edge.imaging.exact import preprocess_image
    from vpr_edge.models.student import load_student, student_preset

    preset = student_preset(run)
    student = load_student(run)
    feats, descs = [], []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.from_numpy(np.stack([preprocess_image(p, preset.preprocess) for p in paths[i : i + batch]]))
            f = student.backbone(x)
            feats.append(f.numpy())
            descs.append(student.aggregator(f).numpy())
    return student, preset, np.concatenate(feats), np.concatenate(descs)


def _database(teacher, ds, map_folder: Path | None, progress: bool):
    """(descriptors, paths) of what queries are ranked against: the map, or the teacher on the database."""
    from vpr_edge.runtime.maps import Map
    from vpr_edge.space import require_same

    if map_folder is not None:
        m = Map.open(map_folder)
        require_same(m.manifest.space, teacher.space, have_name=f"map {map_folder}", want_name="the teacher",
                     fix="build the map with the teacher artifact")
        entries = m.entries()
        paths = [Path(e["path"]) for e in entries]
        return m.descriptors(), paths
    if ds is None:
        raise ConfigError("--images is a plain folder: give --map (a map the teacher built) to rank queries against")
    return teacher_descriptors(teacher, list(ds.database), progress)[1], list(ds.database)


def teacher_descriptors(teacher, paths: list[Path], progress: bool = False, batch: int = 8):
    """(features, descriptors) of the teacher on `paths` (its own exact preprocessing)."""
    from tqdm import tqdm

    from vpr_edge.imaging.exact import preprocess_image

    feats, descs = [], []
    for i in tqdm(range(0, len(paths), batch), desc="teacher", unit="batch", disable=not progress):
        f, d = teacher(np.stack([preprocess_image(p, teacher.preprocess) for p in paths[i : i + batch]]))
        feats.append(f)
        descs.append(d)
    return np.concatenate(feats), np.concatenate(descs)


def _positives(ds, q_idx: np.ndarray, db_paths: list[Path]) -> list[np.ndarray] | None:
    if ds is None:
        return None
    where = {str(Path(p).resolve()): i for i, p in enumerate(db_paths)}
    out = []
    for qi in q_idx:
        out.append(np.array(sorted(where[k] for k in (str(Path(ds.database[j]).resolve()) for j in ds.positives[qi])
                                   if k in where), dtype=np.int64))
    return out


def evaluate_students(runs, teacher_artifact, images, output, *, map_folder=None, limit=None, latency_runs: int = 10,
                      threads: int | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    from vpr_edge.distill.teacher import ArtifactTeacher
    from vpr_edge.models.reference import reference_from_artifact
    from vpr_edge.models.student import read_student_record
    from vpr_edge.space import require_same

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    images = Path(images)
    ds = datasets.load_dataset(images) if datasets.looks_like_dataset(images) else None
    all_q = list(ds.queries) if ds else datasets.list_images(images)
    q_idx = datasets.evenly_spaced(len(all_q), limit) if limit else np.arange(len(all_q))
    queries = [all_q[i] for i in q_idx]
    teacher = ArtifactTeacher(teacher_artifact, threads=threads)
    try:
        t_feat, t_desc = teacher_descriptors(teacher, queries, progress)
        db, db_paths = _database(teacher, ds, Path(map_folder) if map_folder else None, progress)
        positives = _positives(ds, q_idx, db_paths)
        kmax = max(KS)
        t_rank = fidelity.rank_database(db, t_desc, kmax)
        margin = fidelity.top1_margins(db, t_desc)
        upper = margin >= np.median(margin)
        results: dict[str, Any] = {"teacher": {
            "artifact": str(teacher_artifact), "space": teacher.space, "identity": teacher.identity,
            "top1_margin": percentiles(margin.tolist()),
            **(fidelity.recall_at_k(t_rank, positives, KS) if positives is not None else {}),
        }}
        ranked = {"teacher": t_rank}
        cos_all: dict[str, np.ndarray] = {}
        ref = reference_from_artifact(teacher_artifact)
        results["teacher"].update(_torch_stats(ref.model, ref.preset.preprocess.image_size, latency_runs))
        del ref
        for run in [Path(r) for r in runs]:
            _, record = read_student_record(run)
            require_same(record["teacher"]["space"], teacher.space, have_name=f"student {run}",
                         want_name=f"teacher {teacher_artifact}", fix="evaluate a student against the teacher it was distilled from")
            student, preset, s_feat, s_desc = _student_outputs(run, queries)
            if s_feat.shape != t_feat.shape:
                raise ArtifactError(f"student {run} gives features {s_feat.shape}, the teacher {t_feat.shape}")
            cos = np.sum(s_desc * t_desc, axis=1) / np.maximum(
                np.linalg.norm(s_desc, axis=1) * np.linalg.norm(t_desc, axis=1), 1e-12)
            s_rank = fidelity.rank_database(db, s_desc, kmax)
            agree = {f"top{k}_agreement": float(np.mean(np.all(s_rank[:, :k] == t_rank[:, :k], axis=1))) for k in KS}
            same1 = s_rank[:, 0] == t_rank[:, 0]
            agree["top1_agreement_teacher_margin_upper_half"] = float(same1[upper].mean())
            agree["top1_agreement_teacher_margin_lower_half"] = float(same1[~upper].mean()) if (~upper).any() else None
            row: dict[str, Any] = {
                "run": str(run), "student": record["student"], "steps": record.get("steps"),
                "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), **agree,
                "patch_cos_mean": float(np.mean(np.sum(s_feat * t_feat, axis=-1))),
            }
            if teacher.centers is not None:
                row["assignment_agreement"] = float(np.mean(_assign(s_feat, teacher.centers) == _assign(t_feat, teacher.centers)))
            if positives is not None:
                row.update(fidelity.recall_at_k(s_rank, positives, KS))
            row.update(_torch_stats(student, preset.preprocess.image_size, latency_runs))
            row["flops_ratio_teacher_over_student"] = results["teacher"]["gflops"] / max(row["gflops"], 1e-12)
            name = f"student:{run.name}"
            results[name] = row
            ranked[name] = s_rank
            cos_all[name] = cos
    finally:
        teacher.close()
    out = {
        "images": {"source": str(images), "queries": len(queries), "database": len(db_paths),
                   "against": f"map {map_folder}" if map_folder else "the teacher's descriptors of the dataset database",
                   "ground_truth": positives is not None},
        "students": [k for k in results if k != "teacher"],
        "results": results,
    }
    out["markdown"] = _markdown(out)
    with atomic_dir(output, force=force) as tmp:
        from vpr_edge.benchmarks.record import jsonable
        from vpr_edge.atomic import write_json

        write_json(tmp / "eval.json", jsonable({k: v for k, v in out.items() if k != "markdown"}))
        with atomic_file(tmp / "eval.md", "w") as fh:
            fh.write(out["markdown"])
        _plots(tmp, results, cos_all, ranked, queries, db_paths, positives)
    return out


def _markdown(out: dict) -> str:
    r = out["results"]
    lines = [f"# Students vs teacher ({out['images']['queries']} held-out queries from {out['images']['source']}, "
             f"ranked against {out['images']['against']})", "",
             "| model | cos mean / min | top-1 / top-5 agreement | assignment agreement | R@1 | R@5 | params (M) | GFLOPs | "
             "FLOPs vs teacher | PyTorch ms (b1) |", "|---|---|---|---|---|---|---|---|---|---|"]
    t = r["teacher"]
    lines.append(f"| teacher | - | - | - | {t.get('R@1', float('nan')):.3f} | {t.get('R@5', float('nan')):.3f} | "
                 f"{t['params_m']:.1f} | {t['gflops']:.1f} | 1x | {t['latency_ms_p50']:.1f} |")
    for name in out["students"]:
        s = r[name]
        lines.append(
            f"| {name} | {s['cos_mean']:.4f} / {s['cos_min']:.4f} | {s['top1_agreement']:.3f} / {s['top5_agreement']:.3f} | "
            f"{s.get('assignment_agreement', float('nan')):.3f} | {s.get('R@1', float('nan')):.3f} | "
            f"{s.get('R@5', float('nan')):.3f} | {s['params_m']:.1f} | {s['gflops']:.2f} | "
            f"1/{s['flops_ratio_teacher_over_student']:.0f} | {s['latency_ms_p50']:.1f} |")
    m = t.get("top1_margin")
    if m:
        lines += ["", f"The teacher's own top-1 margin (top-1 minus top-2 similarity) per query: median {m['p50']:.4f} "
                      f"(min {m['min']:.4f}, p95 {m['p95']:.4f}). Top-1 agreement on the queries with the upper / lower half "
                      "of those margins: " + "; ".join(
                          f"{n} {r[n]['top1_agreement_teacher_margin_upper_half']:.3f} / "
                          + ("-" if r[n]['top1_agreement_teacher_margin_lower_half'] is None
                             else f"{r[n]['top1_agreement_teacher_margin_lower_half']:.3f}")
                          for n in out["students"]) + "."]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, results: dict, cos_all: dict, ranked: dict, queries, db_paths, positives) -> None:
    from vpr_edge.benchmarks.match_grid import match_grid, pick_queries
    from vpr_edge.benchmarks.plots import _pyplot, _save

    plt = _pyplot()
    names = list(results)
    if positives is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            ax.bar(np.arange(len(KS)) + i * width, [100 * results[n].get(f"R@{k}", 0) for k in KS], width, label=n)
        ax.set_xticks(np.arange(len(KS)) + width * (len(names) - 1) / 2, [f"R@{k}" for k in KS])
        ax.set_ylabel("recall (%)")
        ax.legend(fontsize=7)
        _save(fig, folder / "recall.png")
        plt.close(fig)
    if cos_all:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for n, c in cos_all.items():
            ax.hist(c, bins=30, alpha=0.6, label=n)
        ax.set_xlabel("descriptor cosine, student vs teacher")
        ax.set_ylabel("queries")
        ax.legend(fontsize=7)
        _save(fig, folder / "cosine.png")
        plt.close(fig)
    rows = pick_queries(len(queries), 4)
    pos = positives if positives is not None else [np.zeros(0, np.int64)] * len(queries)
    for n, r in ranked.items():
        match_grid(queries, db_paths, r, pos, rows, folder / f"match_grid_{n.replace(':', '_')}.png", k=5,
                   title=f"{n}: query (blue) and top-5; green = positive, red = not")
