"""`vpr-edge run MAP SOURCE`: the camera loop on a folder (followed as frames arrive) or a video file.

Prints each frame's place (and writes them as JSON lines with --output), with its latency, and at the end
the latency percentiles and frames per second. Frames that cannot be read are reported in place and the
stream goes on; the exit status is 1 when any frame failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpr_edge.cli import options as O


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="place each frame of a folder (followed live) or a video file against a map",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("map", type=Path, metavar="MAP", help="map folder (vpr-edge map build)")
    p.add_argument("source", type=Path, metavar="SOURCE", help="folder of frames, or a video file (needs vpr-edge[video])")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="places per frame (default 1)")
    p.add_argument("--follow", action="store_true",
                   help="keep watching the folder for new frames (a file is taken once its size is stable)")
    p.add_argument("--idle", type=float, default=None, metavar="S",
                   help="with --follow: stop after S seconds without a new frame (default: until interrupted)")
    p.add_argument("--poll", type=float, default=0.2, metavar="S", help="with --follow: seconds between scans (default 0.2)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="video: every N-th frame (default 1)")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE.jsonl",
                   help="write one JSON line per frame (flushed as it goes; FILE.jsonl.partial until the run ends)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    O.add_runtime(p, model="optional")
    p.set_defaults(func=_run, batch=1)
    return p


def _run(args) -> int:
    from vpr_edge.cli.map import shown
    from vpr_edge.errors import ArtifactError
    from vpr_edge.runtime.localize import LatencyLog, Localizer
    from vpr_edge.runtime.sources import open_source

    if args.output is not None and args.output.exists() and not args.force:
        raise ArtifactError(f"{args.output} already exists; pass --force to overwrite it or choose another --output")
    kwargs = O.describer_kwargs(args)
    kwargs["preprocess"] = kwargs["preprocess"] or "fast"  # a camera loop: fast unless asked otherwise
    frames = open_source(args.source, follow=args.follow, poll_s=args.poll, idle_s=args.idle, every=args.every)
    log = LatencyLog()
    partial = args.output.with_name(args.output.name + ".partial") if args.output else None
    out = partial.open("w") if partial else None
    try:
        with Localizer(args.map, artifact=args.model, top_k=args.top_k, batch=args.batch, **kwargs) as loc:
            log = LatencyLog()  # from the first frame, not the model's loading
            for place in loc.locate(frames):
                log.add(place)
                if out is not None:
                    out.write(json.dumps(place.to_json()) + "\n")
                    out.flush()
                if place.error is not None:
                    print(f"vpr-edge: error: {shown(place.error)}", file=sys.stderr)
                elif not args.quiet:
                    best = place.best
                    where = f"{best['score']:.4f}  {shown(best['file'])}" if best else "(empty map)"
                    print(f"{shown(place.name)}  ->  {where}  [{place.latency_ms:.1f} ms]", flush=True)
    except KeyboardInterrupt:
        print("vpr-edge: interrupted", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    s = log.summary()
    lat = s["latency_ms"] or {}
    print(f"{s['frames']} frames, {s['errors']} unreadable, {s['fps'] or 0:.1f} frames/s; latency ms "
          f"p50 {lat.get('p50', 0):.1f} p95 {lat.get('p95', 0):.1f} p99 {lat.get('p99', 0):.1f}")
    if partial is not None:
        partial.replace(args.output)
        print(f"wrote {s['frames']} results to {args.output}")
    return 1 if s["errors"] else 0
