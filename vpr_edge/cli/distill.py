"""`vpr-edge distill cache|train|eval`: students that speak the teacher's descriptor language.

    vpr-edge distill cache IMAGES --teacher PRESET|ARTIFACT --output CACHE [--views 4]
    vpr-edge distill train --cache CACHE --student vits14 --output RUN [--resume]
    torchrun --nproc-per-node 2 -m vpr_edge.cli.main distill train ...      (the same command, DDP)
    vpr-edge distill eval RUN [RUN ...] --teacher ARTIFACT --map MAP --images DIR --output REPORT
    vpr-export --model student:RUN --precision int8 ...                     (export like any preset)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from vpr_edge.cli import options as O
from vpr_edge.cli.options import image_size


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("distill", help="distil ViT-S students that query a teacher's (ViT-G) maps",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="distill_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    c = dsub.add_parser("cache", help="run the teacher once on every image and view; store features, descriptors, "
                        "assignments (sharded, resumable)")
    c.add_argument("images", nargs="+", type=Path, metavar="IMAGES", help="image files and/or folders")
    c.add_argument("--teacher", required=True, metavar="PRESET|ARTIFACT",
                   help="a preset (PyTorch reference; VLAD presets need --vocabulary) or a teacher artifact exported with "
                        "--scope backbone (run by the lean runtime: ONNX Runtime or TensorRT)")
    O.add_output(c, help="cache folder (rerun the same command to resume a killed build)")
    c.add_argument("--weights", default="auto", metavar="auto|random|PATH", help="teacher preset weights (default auto)")
    c.add_argument("--vocabulary", type=Path, default=None, metavar="FILE", help="teacher preset: its VLAD vocabulary")
    c.add_argument("--pca", type=Path, default=None, metavar="FILE", help="teacher preset: its PCA file")
    c.add_argument("--seed", type=int, default=0, help="seed of the augmented views (and of random teacher weights)")
    c.add_argument("--views", type=int, default=4, metavar="N", help="views per image; view 0 is the plain image (default 4)")
    c.add_argument("--shard-size", type=int, default=64, metavar="N", help="images per shard (default 64)")
    c.add_argument("--batch", type=int, default=8, metavar="N", help="views per teacher run (default 8)")
    c.add_argument("--workers", type=int, default=2, metavar="N", help="threads decoding images ahead (default 2)")
    c.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for the teacher")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cache)

    t = dsub.add_parser("train", help="distil a student from a teacher cache (resumable; DDP under torchrun)")
    t.add_argument("--cache", required=True, type=Path, metavar="CACHE", help="teacher cache (distill cache)")
    O.add_output(t, help="run folder: config, metrics.csv, curves.png, checkpoints, student.pt + student.json")
    t.add_argument("--config", type=Path, default=None, metavar="JSON",
                   help="TrainConfig fields as JSON (a run's config.json works); options below override it")
    t.add_argument("--student", default=None, metavar="ARCH", help="vits14 (default), vitb14, vitl14")
    t.add_argument("--student-weights", default=None, metavar="auto|PATH|RUN|random",
                   help="the student's start: auto = the official dinov2 checkpoint (hub cache), PATH, a distillation "
                        "RUN folder of this teacher (fine-tune its student, e.g. on a map's own images), or random")
    t.add_argument("--block", type=int, default=None, help="student block whose tokens are used (default: the last)")
    t.add_argument("--student-size", type=image_size, default=None, metavar="HxW", help="student input (default: teacher's)")
    t.add_argument("--tiny", action="store_true", default=None, help="the student architecture at toy size (tests)")
    for name, typ, what in (("steps", int, "optimizer steps"), ("batch-size", int, "global batch (items per step)"),
                            ("micro-batch-size", int, "items per forward (accumulation = batch / micro / ranks)"),
                            ("lr", float, "peak learning rate"), ("warmup-steps", int, "linear warm-up steps"),
                            ("ema-decay", float, "EMA decay of the student weights (0: off)"),
                            ("checkpoint-every", int, "steps between checkpoints"),
                            ("eval-every", int, "steps between held-out evaluations"),
                            ("heldout-fraction", float, "share of images held out (the last in cache order)")):
        t.add_argument(f"--{name}", type=typ, default=None, help=what)
    t.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None, help="autocast (bf16 on CPU; fp16 CUDA only)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering views (per process)")
    t.add_argument("--image-root", type=Path, default=None, help="where the cache's images are now, if they moved")
    t.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (with a checkpoint)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    t.add_argument("--no-verify", action="store_true", help="check the cache's file sizes only, not their sha256")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = dsub.add_parser("eval", help="students vs their teacher on held-out images: cosine, agreement against the "
                        "teacher's map, recall, assignments, FLOPs, latency (JSON + Markdown + PNG)")
    e.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="student run folders (compared side by side)")
    e.add_argument("--teacher", required=True, type=Path, metavar="ARTIFACT",
                   help="the teacher artifact (backbone scope) whose space the students declare")
    e.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="held-out images: a dataset root (queries vs its database, with ground truth) or a folder")
    e.add_argument("--map", type=Path, default=None, metavar="MAP",
                   help="a map built with the teacher: student and teacher queries are ranked against it")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="at most N queries (evenly spaced)")
    e.add_argument("--latency-runs", type=int, default=10, metavar="N", help="timed batch-1 runs per model (default 10)")
    e.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (PyTorch and ONNX Runtime)")
    O.add_output(e, help="report folder (eval.json, eval.md, PNG plots)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval)
    return p


def _cache(args) -> int:
    from vpr_edge import presets
    from vpr_edge.distill.cache import build_cache

    teacher, close = _open_teacher(args, presets)
    try:
        cache = build_cache(args.images if len(args.images) > 1 else args.images[0], teacher, args.output,
                            views=args.views, seed=args.seed, shard_size=args.shard_size, progress=not args.quiet,
                            batch_size=args.batch, workers=args.workers)
    finally:
        close()
    print(f"cache {args.output}: {cache.num_images} images x {args.views} views = {len(cache)} items "
          f"({cache.feature_dim}-d features on a {cache.grid[0]}x{cache.grid[1]} grid, {cache.descriptor_dim}-d descriptors)")
    return 0


def _open_teacher(args, presets):
    """(teacher, close) for --teacher: an artifact folder (lean runtime) or a preset (PyTorch reference)."""
    from vpr_edge.errors import ConfigError

    target = Path(args.teacher)
    if (target / "manifest.json").exists():
        from vpr_edge.distill.teacher import ArtifactTeacher

        if args.vocabulary or args.pca:
            raise ConfigError("--vocabulary/--pca apply to a preset teacher; an artifact teacher brings its own")
        teacher = ArtifactTeacher(target, threads=args.threads)
        return teacher, teacher.close
    from vpr_edge.distill.teacher import TorchTeacher

    preset = presets.get(args.teacher)
    if presets.head(preset).vocabulary and args.vocabulary is None:
        raise ConfigError(
            f"teacher {preset.name} needs the VLAD vocabulary its maps use: pass --vocabulary FILE, or give the teacher "
            "artifact itself (exported with --scope backbone)"
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    teacher = TorchTeacher.from_preset(preset, args.weights, vocabulary=args.vocabulary, pca=args.pca, seed=args.seed)
    return teacher, (lambda: None)


def _train_config(args):
    import dataclasses

    from vpr_edge.distill.config import TrainConfig

    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    weights = args.student_weights
    if weights not in (None, "auto", "random", "random-outliers"):
        weights = str(Path(weights).resolve())  # recorded in the run: resumable from any working directory
    student = {k: v for k, v in {"arch": args.student, "weights": weights, "block": args.block,
                                 "image_size": args.student_size, "tiny": args.tiny}.items() if v is not None}
    if student:
        cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, **student))
    knobs = {k: getattr(args, k) for k in ("steps", "batch_size", "micro_batch_size", "lr", "warmup_steps",
                                           "ema_decay", "checkpoint_every", "eval_every", "heldout_fraction", "amp")}
    return dataclasses.replace(cfg, **{k: v for k, v in knobs.items() if v is not None})


def _train(args) -> int:
    from vpr_edge.distill.train import train

    stop = {"requested": False}

    def request_stop(signum, frame):  # finish the step, write a checkpoint, exit: --resume continues exactly
        stop["requested"] = True

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = _train_config(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    result = train(config, args.cache, args.output, resume=args.resume, device=args.device, workers=args.workers,
                   progress=not args.quiet, image_root=args.image_root, stop_after=args.stop_after,
                   should_stop=lambda: stop["requested"], verify="size" if args.no_verify else "sha256")
    if result.complete:
        held = (result.last_eval or {}).get("heldout", {})
        extra = f"; held-out cosine {held['desc_cos_mean']:.4f}" if "desc_cos_mean" in held else ""
        print(f"finished at step {result.step}: {result.run_dir}/student.pt{extra}; export it with "
              f"`vpr-export --model student:{result.run_dir} --precision fp16`", file=sys.stderr)
    else:
        print(f"stopped at step {result.step} (continue with --resume): {result.run_dir}", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from vpr_edge.benchmarks.distill_eval import evaluate_students

    out = evaluate_students(args.runs, args.teacher, args.images, args.output, map_folder=args.map, limit=args.limit,
                            latency_runs=args.latency_runs, threads=args.threads, force=args.force,
                            progress=not args.quiet)
    print(out["markdown"])
    print(json.dumps({"report": str(args.output), "students": list(out["students"])}))
    return 0
