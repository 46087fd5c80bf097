"""`vpr-edge map build|add|query|info`: place-recognition maps on the robot (no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vpr_edge.cli import options as O
from vpr_edge.runtime.map_index import DEFAULT_RERANK, INDEX_TYPES, REFINE_TYPES


def _search_options(p: argparse.ArgumentParser, build: bool) -> None:
    g = p.add_argument_group("search" + ("" if build else " (override the map's recorded settings for this query)"))
    g.add_argument(
        "--nprobe",
        type=int,
        default=None,
        metavar="N",
        help="IVF lists visited per query" + (" (default: nlist / 32, at least 16)" if build else ""),
    )
    if build:
        g.add_argument(
            "--refine",
            choices=REFINE_TYPES,
            default=None,
            help="ivfpq: re-rank PQ candidates with vectors kept as sq8 (8-bit, d bytes each; default) "
            "or flat (float32, 4d bytes); none: PQ order only",
        )
    g.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="R",
        help="ivfpq: PQ candidates re-ranked per query" + (f" (default {DEFAULT_RERANK})" if build else ""),
    )


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("map", help="build, extend, query and inspect place-recognition maps")
    msub = p.add_subparsers(dest="map_command", metavar="ACTION")

    b = msub.add_parser("build", help="describe images into a map folder (resumable: rerun to continue)")
    b.add_argument("images", nargs="+", type=Path, metavar="IMAGES", help="image folders and/or files")
    b.add_argument("--output", "-o", type=Path, required=True, metavar="MAP", help="map folder to write")
    b.add_argument("--force", action="store_true", help="discard an existing map at --output and rebuild")
    b.add_argument(
        "--index",
        choices=INDEX_TYPES,
        default="flat",
        help="flat: exact (default); ivfflat/ivfpq: trained on the map, for large maps "
        "(ivfpq re-ranks its candidates: see --refine)",
    )
    b.add_argument("--metadata", choices=["utm"], default=None, help="utm: record @east@north@ from file names")
    b.add_argument("--chunk", type=int, default=256, metavar="N", help="images per committed chunk (default 256)")
    b.add_argument("--recursive", action="store_true", help="also take images from sub-folders")
    b.add_argument("--keep-teacher-features", action="store_true",
                   help="also keep the per-patch features of every image (backbone-scope artifact; float16, ~0.8 MB per "
                        "image for ViT-G): `vpr-edge distill train --cache MAP` then distils a map-specific student "
                        "without running the teacher again")
    _search_options(b, build=True)
    O.add_runtime(b, model="required")
    b.set_defaults(func=_build)

    a = msub.add_parser("add", help="add images to a map (those already in it are skipped)")
    a.add_argument("map", type=Path, metavar="MAP")
    a.add_argument("images", nargs="+", type=Path, metavar="IMAGES")
    a.add_argument("--recursive", action="store_true", help="also take images from sub-folders")
    O.add_runtime(a, model="optional")
    a.set_defaults(func=_add)

    q = msub.add_parser("query", help="the most similar map images for each query image")
    q.add_argument("map", type=Path, metavar="MAP")
    q.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    q.add_argument("--top-k", type=int, default=5, metavar="K", help="results per query (default 5)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _search_options(q, build=False)
    O.add_runtime(q, model="optional")
    q.set_defaults(func=_query)

    i = msub.add_parser("info", help="what a map holds and how it was built")
    i.add_argument("map", type=Path, metavar="MAP")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def _build(args) -> int:
    from vpr_edge.runtime.maps import build_map

    m = build_map(
        args.images,
        args.model,
        args.output,
        batch=args.batch,
        index=args.index,
        index_options={"nprobe": args.nprobe, "refine": args.refine, "rerank": args.rerank},
        metadata=args.metadata,
        chunk_size=args.chunk,
        force=args.force,
        recursive=args.recursive,
        keep_teacher_features=args.keep_teacher_features,
        **O.describer_kwargs(args),
    )
    d = m.details
    print(f"map {m.folder}: {d['count']} images, {d['dim']}-d, index {d['index']['type']}, {d['failed']} unreadable")
    return 0


def _add(args) -> int:
    from vpr_edge.runtime.maps import add_to_map

    m, n = add_to_map(
        args.map,
        args.images,
        artifact=args.model,
        batch=args.batch,
        recursive=args.recursive,
        **O.describer_kwargs(args),
    )
    print(f"map {m.folder}: added {n} images, now {m.details['count']}")
    return 0


def _query(args) -> int:
    from vpr_edge.runtime.maps import query_map

    results = query_map(
        args.map,
        args.images,
        top_k=args.top_k,
        artifact=args.model,
        batch=args.batch,
        nprobe=args.nprobe,
        rerank=args.rerank,
        **O.describer_kwargs(args),
    )
    failed = [r for r in results if "error" in r]
    for r in failed:  # reported, and the exit status says so; the other queries are answered
        print(f"vpr-edge: error: {shown(r['error'])}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))  # ensure_ascii: undecodable file names come out escaped
        return 1 if failed else 0
    for r in results:
        if "error" in r:
            continue
        print(shown(r["query"]))
        for hit in r["results"]:
            utm = f"  utm {hit['utm'][0]:.1f},{hit['utm'][1]:.1f}" if hit.get("utm") else ""
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {shown(hit['file'])}{utm}")
    return 1 if failed else 0


def shown(text: str) -> str:
    """A path as the terminal can print it: bytes that are not UTF-8 (kept by Python as surrogates) become
    replacement characters instead of crashing the output."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _info(args) -> int:
    from vpr_edge.runtime.maps import Map

    info = Map.open(args.map, require_complete=False).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:>10}: {value}")
    return 0
