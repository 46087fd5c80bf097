"""`vpr-edge pca fit`: PCA-whitening fitted on a preset's descriptors of IMAGES.

torch, faiss and the model are imported inside the handler, so `--help` works without them.
"""

from __future__ import annotations

from pathlib import Path

from vpr_edge.cli import options as O
from vpr_edge.errors import ConfigError, InputError
from vpr_edge.cli.vocab import image_paths, refuse_existing


def register(sub) -> None:
    p = sub.add_parser("pca", help="fit PCA-whitening for a preset's descriptors (.npz)")
    psub = p.add_subparsers(dest="pca_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.print_help() or 2)
    f = psub.add_parser(
        "fit",
        help="PCA-whitening of the preset's VLAD/GeM descriptors of IMAGES",
        description="Describe IMAGES (files or folders; a dataset root uses its database/) with the preset before "
        "PCA, then fit PCA-whitening to --dim (faiss). Needs more images than --dim. Example: "
        "vpr-edge pca fit data/indoor --model anyloc-dinov2-pca --vocabulary indoor.npz --dim 512 -o pca.npz",
    )
    f.add_argument("images", type=Path, nargs="+", metavar="IMAGES", help="image files or folders")
    O.add_model(f)
    f.add_argument("--dim", type=int, default=None, help="output dimension (default: the preset's, else 512)")
    f.add_argument("--no-whiten", dest="whiten", action="store_false", help="plain PCA (orthonormal axes)")
    f.add_argument("--batch", type=int, default=8, help="images per forward pass")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    O.add_output(f, help="PCA file (.npz)")
    f.set_defaults(func=_fit)


def _fit(args) -> int:
    from vpr_edge.models import build as B
    from vpr_edge.models.pca import fit_pca_whitening
    from vpr_edge.models.reference import build_reference
    from vpr_edge.models.vocabulary import load_vocabulary

    preset = O.resolve_preset(args)
    if preset.aggregator.kind not in ("vlad", "gem"):
        raise ConfigError(f"{preset.name} aggregates with {preset.aggregator.kind}; PCA files are for VLAD/GeM presets")
    dim = args.dim or preset.aggregator.pca_dim or 512
    preset = preset.with_overrides(pca_dim=dim)
    base = preset.without_pca()
    if dim >= base.descriptor_dim:
        raise ConfigError(f"--dim {dim} must be below the descriptor size {base.descriptor_dim} of {preset.name}")
    refuse_existing(args.output, args.force)
    paths = image_paths(args.images)
    if len(paths) <= dim:  # fail before any feature extraction
        raise InputError(
            f"too few images to do PCA: whitening to {dim} dims needs more than {dim} images, got {len(paths)}; "
            f"use more images or --dim <= {max(len(paths) - 1, 1)}"
        )
    vocab = None
    if base.aggregator.kind == "vlad":
        if args.vocabulary is None:
            raise ConfigError(f"{preset.name} is a VLAD preset: pass the --vocabulary its descriptors are built with")
        vocab = load_vocabulary(args.vocabulary, base)
    ref = build_reference(base, args.weights, vocabulary=vocab, seed=args.seed)
    desc = B.describe_paths(ref.model, paths, args.batch, not args.quiet)
    pw = fit_pca_whitening(
        desc, preset, dim, whiten=args.whiten, vocabulary=vocab,
        source=f"vpr-edge pca fit: {', '.join(map(str, args.images))}", weights=ref.weights_id,
    )  # fmt: skip
    pw.save(args.output)
    print(f"wrote {args.output}: {pw.in_dim} -> {pw.out_dim} ({'whitened' if args.whiten else 'PCA'}) from {len(desc)} images")
    return 0
