"""`vpr-edge bench`: three benchmarks behind one subcommand, chosen by the first argument.

    vpr-edge bench DATASET --variant NAME=ARTIFACT_DIR ... [--pytorch [REF]] --output RUN_DIR
    vpr-edge bench map [--size 1000000 --dim 512 --nlist N --m M --nprobe P] --output RUN_DIR
    vpr-edge bench soak ARTIFACT [--queries 10000 --images DIR] --output RUN_DIR

(A dataset folder literally named `map` or `soak` is written `./map`.) Every run writes its own
folder: results.json (with argv, the command, the resolved configuration, package versions and
the machine), results.md (the tables printed at the end), command.txt, and for datasets PNG plots
and match grids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr_edge.cli import options as O
from vpr_edge.cli.options import int_list

MODES = ("dataset", "map", "soak")

# options that only one mode reads; given to another mode they are an error, not silently ignored
_ONLY = {
    "dataset": ("variant", "pytorch", "weights", "device", "pytorch_fp16", "batches", "runs", "limit",
                "describe_batch", "match_grid", "grid_k", "baseline", "search_runs", "no_plots"),
    "map": ("size", "dim", "nlist", "m", "nbits", "nprobe", "refine", "exact_queries", "train", "clusters",
            "spread", "query_noise", "chunk"),
    "soak": ("sample_every", "images", "map_size", "index", "top_k"),
}
_SHARED = {"queries": ("map", "soak"), "backend": ("dataset", "soak"), "providers": ("dataset", "soak"),
           "preprocess": ("dataset", "soak"), "workers": ("dataset", "soak")}

def _count(text: str) -> int:
    """Integers, also written 1e6 or 1_000_000."""
    try:
        val = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 1000000 or 1e6, got {text!r}") from None
    if val != int(val):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(val)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="benchmark variants on a dataset (accuracy, fidelity, latency, memory), a synthetic map, or a soak run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="DATASET|map|soak",
                   help="a dataset folder (Corridor-like CSV, VPR-datasets-downloader, VPR-Bench), or `map`, or `soak`")
    p.add_argument("artifact", nargs="?", type=Path, default=None, metavar="ARTIFACT", help="soak: the artifact folder")
    O.add_output(p, help="run folder to write (results.json, results.md, command.txt, plots)")
    g = p.add_argument_group("all benchmarks")
    g.add_argument("--warmup", type=int, default=None, help="untimed runs first (dataset: batches, 5; map: queries, 20; soak: queries, 50)")
    g.add_argument("--seed", type=int, default=0, help="seed for synthetic data")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    O.add_runtime(p, model=None, batch=False, title="runtime (dataset and soak benchmarks)")

    d = p.add_argument_group("dataset benchmark (vpr-edge bench DATASET)")
    d.add_argument("--variant", action="append", default=None, metavar="NAME=ARTIFACT_DIR",
                   help="an artifact folder to measure (ONNX FP32/FP16/INT8, TensorRT engine); repeat for several. "
                        "NAME@cuda=DIR (ORT providers) or NAME@trt=DIR / NAME@ort=DIR picks the runtime per variant")
    d.add_argument("--pytorch", nargs="?", const="", default=None, metavar="REF",
                   help="also measure the PyTorch reference (FP32 eager; FP16 too with CUDA), rebuilt from the manifest "
                        "of REF (a variant name or artifact folder; default the first variant) with its vocabulary/PCA")
    d.add_argument("--weights", default=None, metavar="auto|random|PATH",
                   help="the checkpoint the artifact was exported from, for the PyTorch reference (checked against the "
                        "manifest's weights hash; random weights are rebuilt from their seed without it)")
    d.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="PyTorch device (default auto: cuda if available)")
    d.add_argument("--pytorch-fp16", choices=("auto", "on", "off"), default=None, help="PyTorch FP16 variant (default auto: with CUDA)")
    d.add_argument("--batches", type=int_list, default=None, metavar="1,4,8", help="batch sizes timed (default 1,4,8)")
    d.add_argument("--runs", type=int, default=None, help="timed batches per batch size (default 50)")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="N evenly spaced queries and a database of their positives filled up to N images")
    d.add_argument("--describe-batch", type=int, default=None, help="batch for the accuracy pass (default: the artifact's default batch)")
    d.add_argument("--search-runs", type=int, default=None, help="timed single-query searches (default 200)")
    d.add_argument("--match-grid", type=int, default=None, metavar="N", help="queries in each variant's match grid (default 4; 0: none)")
    d.add_argument("--grid-k", type=int, default=None, help="retrieved images per query in the match grid (default 5)")
    d.add_argument("--baseline", default=None, metavar="NAME", help="variant the ratios are against (default pytorch-fp32 when measured)")
    d.add_argument("--no-plots", action="store_true", default=None, help="skip the PNG plots (no matplotlib needed)")

    m = p.add_argument_group("synthetic map benchmark (vpr-edge bench map)")
    m.add_argument("--size", type=_count, default=None, help="map vectors (default 1e6)")
    m.add_argument("--dim", type=int, default=None, help="vector dimension (default 512)")
    m.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the runtime's choice for --size)")
    m.add_argument("--m", type=int, default=None, help="PQ sub-quantizers; must divide --dim (default: the runtime's choice)")
    m.add_argument("--nbits", type=int, default=None, help="bits per PQ code (default: the runtime's choice)")
    m.add_argument("--nprobe", type=int, default=None, help="lists visited per query (default: the runtime's choice)")
    m.add_argument("--refine", type=int, default=None, metavar="F", help="re-rank F x k IVF-PQ candidates exactly (default 0: off)")
    m.add_argument("--queries", type=_count, default=None, help="map: timed queries (default 1000); soak: queries (default 10000)")
    m.add_argument("--exact-queries", type=int, default=None, help="queries timed on the exact index (default 50)")
    m.add_argument("--train", type=_count, default=None, help="IVF-PQ training sample (default max(50 nlist, 40 * 2^nbits))")
    m.add_argument("--clusters", type=_count, default=None, help="synthetic place clusters (default size / 500)")
    m.add_argument("--spread", type=float, default=None, help="noise norm around a cluster centre (default 0.1: dense, near-duplicate places)")
    m.add_argument("--query-noise", type=float, default=None, help="noise norm of a query around its map vector (default 0.2)")
    m.add_argument("--chunk", type=_count, default=None, help="vectors generated and added at a time (default 50000)")

    s = p.add_argument_group("soak (vpr-edge bench soak ARTIFACT)")
    s.add_argument("--sample-every", type=int, default=None, help="sample RSS every N queries (default 100)")
    s.add_argument("--images", type=Path, default=None, metavar="DIR", help="query images (default: synthetic 480x640)")
    s.add_argument("--map-size", type=_count, default=None, help="map vectors searched per query (default 10000)")
    s.add_argument("--index", choices=("flat", "ivfflat", "ivfpq"), default=None, help="map index (default flat)")
    s.add_argument("--top-k", type=int, default=None, help="results per query (default 5)")
    p.set_defaults(func=_run)
    return p


def mode_of(args: argparse.Namespace) -> str:
    if args.target in ("map", "soak"):
        return args.target
    return "dataset"


def check_options(args: argparse.Namespace, mode: str) -> None:
    """Refuse options that belong to another benchmark (they would be silently ignored otherwise)."""
    from vpr_edge.errors import ConfigError

    allowed = set(_ONLY[mode]) | {k for k, modes in _SHARED.items() if mode in modes}
    foreign = [k for ks in _ONLY.values() for k in ks] + list(_SHARED)
    bad = sorted({k for k in foreign if k not in allowed and getattr(args, k, None) is not None})
    if bad:
        opts = ", ".join("--" + k.replace("_", "-") for k in bad)
        usage = {"dataset": "vpr-edge bench DATASET", "map": "vpr-edge bench map", "soak": "vpr-edge bench soak ARTIFACT"}[mode]
        raise ConfigError(f"{opts} do(es) not apply to `{usage}`; see `vpr-edge bench --help` for which options go where")
    if mode == "soak" and args.artifact is None:
        raise ConfigError("`vpr-edge bench soak` needs the artifact folder: vpr-edge bench soak ARTIFACT --output RUN_DIR")
    if mode != "soak" and args.artifact is not None:
        raise ConfigError(f"unexpected second argument {args.artifact}; only `vpr-edge bench soak ARTIFACT` takes one")


def _or(value, default):
    return default if value is None else value


def _set_threads(threads: int | None, torch_too: bool) -> None:
    if not threads:
        return
    from vpr_edge.lazy import available, lazy_import

    if available("faiss"):
        lazy_import("faiss").omp_set_num_threads(threads)
    if torch_too:
        lazy_import("torch").set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    mode = mode_of(args)
    check_options(args, mode)
    return {"dataset": _run_dataset, "map": _run_map, "soak": _run_soak}[mode](args)


def _run_dataset(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vpr_edge.atomic import atomic_dir
    from vpr_edge.benchmarks import record, report
    from vpr_edge.benchmarks.dataset_bench import BenchConfig, run_dataset_bench
    from vpr_edge.benchmarks.variants import plan_variants
    from vpr_edge.errors import ConfigError, InputError
    from vpr_edge.lazy import lazy_import

    dataset = Path(args.target)
    if not dataset.is_dir():
        raise InputError(f"{dataset}: dataset folder not found (or use `vpr-edge bench map` / `vpr-edge bench soak ARTIFACT`)")
    plots = not args.no_plots
    if plots:
        lazy_import("matplotlib")  # fail before an hour of measuring, not after
    device, cuda = "cpu", False
    if args.pytorch is not None:
        torch = lazy_import("torch")
        cuda = bool(torch.cuda.is_available())
        device = args.device or "auto"
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        if device == "cuda" and not cuda:
            raise ConfigError("--device cuda: PyTorch sees no CUDA GPU; use --device cpu")
    elif args.device or args.weights or args.pytorch_fp16:
        raise ConfigError("--device, --weights and --pytorch-fp16 configure the PyTorch reference; add --pytorch")
    specs = plan_variants(args.variant or [], args.pytorch, _or(args.pytorch_fp16, "auto"), cuda=device == "cuda")
    cfg = BenchConfig(
        dataset=dataset,
        variants=specs,
        batches=_or(args.batches, (1, 4, 8)),
        runs=_or(args.runs, 50),
        warmup=_or(args.warmup, 5),
        limit=args.limit,
        describe_batch=args.describe_batch,
        search_runs=_or(args.search_runs, 200),
        match_grid=_or(args.match_grid, 4),
        grid_k=_or(args.grid_k, 5),
        baseline=args.baseline,
        backend=_or(args.backend, "auto"),
        providers=list(O.providers(args) or []) or None,
        threads=args.threads,
        weights=args.weights,
        seed=args.seed,
        device=device,
        progress=not args.quiet,
        preprocess=args.preprocess,
        workers=args.workers,
        ort_graph=args.ort_graph,
        spin=args.ort_spin,
    )
    cfg.check()
    _set_threads(args.threads, torch_too=args.pytorch is not None)
    config = {k: v for k, v in asdict(cfg).items() if k != "variants"}
    config["variants"] = [{"name": s.name, "path": str(s.path), "pytorch": s.pytorch, "fp16": s.fp16, **s.options} for s in specs]
    with atomic_dir(args.output, force=args.force) as tmp:
        header = record.run_header("dataset", config, command=record.command_from_args(args))
        res, arrays, sub = run_dataset_bench(cfg, header)
        files = _dataset_figures(res, arrays, sub, cfg, tmp, plots)
        res["files"] = sorted(files + [record.RESULTS_JSON, record.RESULTS_MD, record.COMMAND_TXT])
        md = report.dataset_markdown(res)
        record.write_run(tmp, res, md)
    print(md)
    print(f"wrote {args.output}/ ({', '.join(res['files'])})")
    return 0


def _dataset_figures(res, arrays, sub, cfg, folder: Path, plots: bool) -> list[str]:
    from vpr_edge.benchmarks.match_grid import match_grid, pick_queries

    files = []
    if plots:
        from vpr_edge.benchmarks.plots import write_dataset_plots

        files += [p.name for p in write_dataset_plots(res, folder)]
    rows = pick_queries(len(sub.queries), cfg.match_grid)
    if rows:
        for name, arr in arrays.items():
            path = folder / f"match_grid_{name}.png"
            match_grid(sub.queries, sub.database, arr["ranked"], sub.positives, rows, path, k=cfg.grid_k,
                       title=f"{name}: query (blue) and top-{cfg.grid_k}; green = positive, red = not")
            files.append(path.name)
    return files


def _run_map(args: argparse.Namespace) -> int:
    from vpr_edge.atomic import atomic_dir
    from vpr_edge.benchmarks import record, report
    from vpr_edge.benchmarks.map_bench import MapBenchConfig, run_map_bench

    d = MapBenchConfig()
    cfg = MapBenchConfig(
        size=_or(args.size, d.size), dim=_or(args.dim, d.dim), nlist=args.nlist, m=args.m, nbits=args.nbits,
        nprobe=args.nprobe, refine=_or(args.refine, d.refine), queries=_or(args.queries, d.queries),
        exact_queries=_or(args.exact_queries, d.exact_queries), train=args.train, clusters=args.clusters,
        spread=_or(args.spread, d.spread), query_noise=_or(args.query_noise, d.query_noise),
        chunk=_or(args.chunk, d.chunk), warmup=_or(args.warmup, d.warmup), threads=args.threads, seed=args.seed,
        progress=not args.quiet,
    )
    resolved = cfg.resolved()  # validate before creating the run folder
    with atomic_dir(args.output, force=args.force) as tmp:
        from dataclasses import asdict

        header = record.run_header("map", asdict(resolved), command=record.command_from_args(args))
        out = {**header, **run_map_bench(cfg)}
        md = report.map_markdown(out)
        out["files"] = [record.RESULTS_JSON, record.RESULTS_MD, record.COMMAND_TXT]
        record.write_run(tmp, out, md)
    print(md)
    print(f"wrote {args.output}/")
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    from vpr_edge.atomic import atomic_dir
    from vpr_edge.benchmarks import record, report
    from vpr_edge.benchmarks.soak import SoakConfig, run_soak

    d = SoakConfig(artifact=args.artifact)
    cfg = SoakConfig(
        artifact=args.artifact, queries=_or(args.queries, d.queries), sample_every=_or(args.sample_every, d.sample_every),
        warmup=_or(args.warmup, d.warmup), images=args.images, map_size=_or(args.map_size, d.map_size),
        index=_or(args.index, d.index), top_k=_or(args.top_k, d.top_k), backend=_or(args.backend, "auto"),
        providers=list(O.providers(args) or []) or None, threads=args.threads, seed=args.seed, progress=not args.quiet,
        preprocess=args.preprocess, workers=args.workers,
    )
    cfg.check()
    _set_threads(args.threads, torch_too=False)
    with atomic_dir(args.output, force=args.force) as tmp:
        out = run_soak(cfg)
        out = {**record.run_header("soak", out.pop("config"), command=record.command_from_args(args)), **out}
        md = report.soak_markdown(out)
        out["files"] = [record.RESULTS_JSON, record.RESULTS_MD, record.COMMAND_TXT]
        record.write_run(tmp, out, md)
    print(md)
    print(f"wrote {args.output}/")
    return 0
