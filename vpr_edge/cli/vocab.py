"""`vpr-edge vocab fit|import|info`: VLAD vocabularies as files.

torch, faiss and the model are imported inside the handlers, so `--help` works without them.
"""

from __future__ import annotations

import json
from pathlib import Path

from vpr_edge import presets
from vpr_edge.cli import options as O
from vpr_edge.errors import ArtifactError, ConfigError, InputError

def image_paths(items: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively; a dataset root contributes its database images."""
    from vpr_edge.datasets import collect_images

    paths = collect_images(items, recursive=True, database_of_datasets=True)
    if not paths:
        raise InputError(f"no images found in {', '.join(map(str, items))}")
    return paths


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ArtifactError(f"{path} already exists; pass --force to overwrite it or choose another --output")


def register(sub) -> None:
    p = sub.add_parser("vocab", help="fit, import or inspect VLAD vocabularies (.npz)")
    vsub = p.add_subparsers(dest="vocab_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    f = vsub.add_parser(
        "fit",
        help="cosine k-means on a preset's facet features of IMAGES",
        description="Fit a VLAD vocabulary: facet features of IMAGES (files or folders; a dataset root uses its "
        "database/), at most --per-image random patches per image, streaming into a bounded sample, "
        "cosine k-means (faiss). Example: vpr-edge vocab fit data/indoor --model anyloc-dinov2 -o indoor.npz",
    )
    f.add_argument("images", type=Path, nargs="+", metavar="IMAGES", help="image files or folders")
    O.add_model(f)
    f.add_argument("--clusters", "-k", type=int, default=None, metavar="K", help="number of centres (default: preset's)")
    f.add_argument("--per-image", type=int, default=1000, metavar="N", help="patches sampled per image (default 1000)")
    f.add_argument("--max-patches", type=int, default=200_000, metavar="N",
                   help="at most N patches kept for k-means (memory bound; default 200000)")
    f.add_argument("--batch", type=int, default=8, help="images per forward pass")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    O.add_output(f, help="vocabulary file (.npz)")
    f.set_defaults(func=_fit)

    i = vsub.add_parser("import", help="AnyLoc's released c_centers.pt -> vocabulary .npz for a preset")
    i.add_argument("centers", type=Path, metavar="C_CENTERS_PT", help="AnyLoc c_centers.pt ([K, D] tensor)")
    i.add_argument("--model", required=True, metavar="PRESET", help="preset the centres were made for")
    i.add_argument("--layer", type=int, default=None, help="override the facet block")
    i.add_argument("--facet", choices=presets.FACETS, default=None, help="override the facet")
    i.add_argument("--clusters", "-k", type=int, default=None, metavar="K", help="number of centres (default: preset's)")
    O.add_output(i, help="vocabulary file (.npz)")
    i.set_defaults(func=_import)

    n = vsub.add_parser("info", help="what a vocabulary file holds and what it was made for")
    n.add_argument("file", type=Path, metavar="FILE", help=".npz vocabulary or AnyLoc c_centers.pt")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    n.set_defaults(func=_info)


def _fit(args) -> int:
    from vpr_edge.models import build as B
    from vpr_edge.models.vocabulary import fit_vocabulary
    from vpr_edge.models.weights import weights_id

    preset = O.resolve_preset(args)
    if preset.aggregator.kind != "vlad":
        raise ConfigError(f"{preset.name} aggregates with {preset.aggregator.kind}; vocabularies are for VLAD presets")
    if args.clusters is not None:
        preset = preset.with_overrides(clusters=args.clusters)
    refuse_existing(args.output, args.force)
    paths = image_paths(args.images)
    progress = not args.quiet
    backbone = B.build_backbone(preset, args.weights, seed=args.seed, state_dict=B.fetch_release(preset, args.weights))
    vocab = fit_vocabulary(
        B.iter_image_features(backbone, paths, preset, args.batch, progress),
        preset=preset,
        per_image=args.per_image,
        seed=args.seed,
        progress=progress,
        max_patches=args.max_patches,
        source=f"vpr-edge vocab fit: {', '.join(map(str, args.images))}",
        weights=weights_id(args.weights, preset.weights, args.seed),
    )
    vocab.save(args.output)
    m = vocab.meta
    print(
        f"wrote {args.output}: {vocab.k} centres x {vocab.dim} for {preset.name} from {m['images']} images "
        f"({m['patches_used']} patches used of {m['patches_seen']} sampled)"
    )
    return 0


def _import(args) -> int:
    from vpr_edge.models.vocabulary import import_anyloc_centers

    preset = presets.get(args.model).with_overrides(layer=args.layer, facet=args.facet)
    if preset.aggregator.kind != "vlad":
        raise ConfigError(f"{preset.name} aggregates with {preset.aggregator.kind}; vocabularies are for VLAD presets")
    if args.clusters is not None:
        preset = preset.with_overrides(clusters=args.clusters)
    refuse_existing(args.output, args.force)
    vocab = import_anyloc_centers(args.centers, preset)
    vocab.save(args.output)
    print(f"wrote {args.output}: {vocab.k} centres x {vocab.dim} from {args.centers} for {preset.name}")
    return 0


def _info(args) -> int:
    from vpr_edge.models.vocabulary import load_vocabulary  # .npz, or AnyLoc's c_centers.pt (torch)

    vocab = load_vocabulary(args.file)
    info = vocab.summary()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    return 0
