"""Entry point for one process or torchrun:

    python -m vpr_edge.distill.train_main --config run.json --cache CACHE --run-dir RUN [--resume]
    torchrun --nproc-per-node 2 -m vpr_edge.distill.train_main --config run.json --cache CACHE --run-dir RUN

`--config` is a JSON object of TrainConfig fields (nested `student` / `losses` objects; a run
folder's config.json works too). SIGTERM / SIGINT stop after the current step with a checkpoint,
so `--resume` continues exactly. Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys

from vpr_edge.errors import VprEdgeError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpr_edge.distill.train_main", description="Distil a student from a teacher cache.")
    p.add_argument("--config", required=True, help="JSON file of TrainConfig fields")
    p.add_argument("--cache", required=True, help="teacher cache folder (distill.cache.build_cache)")
    p.add_argument("--run-dir", required=True, help="run folder: config, metrics, checkpoints, student")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering views (per process)")
    p.add_argument("--image-root", default=None, help="where the cache's images are now, if they moved")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (with a checkpoint)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: leave torch's default)")
    p.add_argument("--verify", default="sha256", choices=("sha256", "size"), help="how the cache is checked when opened")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stop = {"requested": False}

    def request_stop(signum, frame):  # finish the step, checkpoint, exit
        stop["requested"] = True

    try:
        import torch

        from vpr_edge.distill.config import TrainConfig
        from vpr_edge.distill.train import train

        if args.threads:
            torch.set_num_threads(args.threads)
        config = TrainConfig.load(args.config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)
        result = train(
            config, args.cache, args.run_dir, resume=args.resume, device=args.device, workers=args.workers,
            progress=not args.quiet, image_root=args.image_root, stop_after=args.stop_after,
            should_stop=lambda: stop["requested"], verify=args.verify,
        )
    except VprEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    state = "finished" if result.complete else "stopped (resume with --resume)"
    if not args.quiet:
        print(f"{state} at step {result.step}: {result.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
