"""`vpr-edge describe`: the PyTorch reference on a dataset (recall@k) or a folder (descriptors)."""

from __future__ import annotations

import json
from pathlib import Path

from vpr_edge.cli import options as O


def register(sub) -> None:
    p = sub.add_parser(
        "describe",
        help="describe images with the PyTorch reference; on a dataset with ground truth print recall@k",
        description="Describe a dataset (database/ + queries/ + ground truth) or a folder of images with a preset. "
        "VLAD presets without --vocabulary fit a map-specific vocabulary on the database images first.",
    )
    p.add_argument("images", type=Path, help="dataset root or folder of images")
    O.add_model(p)
    O.add_output(p, required=False, help="write descriptors (.npz with names + descriptors)")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--per-image", type=int, default=200, help="patches per image sampled when fitting a vocabulary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import numpy as np

    from vpr_edge import datasets, fidelity
    from vpr_edge.atomic import atomic_file
    from vpr_edge.errors import ArtifactError
    from vpr_edge.models import build as B
    from vpr_edge.models.reference import build_reference

    preset = O.resolve_preset(args)
    progress = not args.quiet
    ds = datasets.load_dataset(args.images) if datasets.looks_like_dataset(args.images) else None
    paths = (list(ds.database) + list(ds.queries)) if ds else datasets.list_images(args.images)
    if args.output and args.output.exists() and not args.force:
        raise ArtifactError(f"{args.output} already exists; pass --force to overwrite it or choose another --output")
    fit_on = list(ds.database) if ds else paths

    def fit_vocabulary(backbone, weights_id):
        from vpr_edge.models import vocabulary as V

        print(f"no --vocabulary: fitting a map-specific vocabulary ({preset.aggregator.clusters} clusters) "
              f"on {len(fit_on)} images")
        return V.fit_vocabulary(
            B.iter_image_features(backbone, fit_on, preset, args.batch, progress),
            preset=preset, k=preset.aggregator.clusters, per_image=args.per_image, seed=args.seed,
            progress=progress, source=f"map-specific: {args.images}", weights=weights_id,
        )

    def fit_pca(no_pca, weights_id, vocab):
        from vpr_edge.models import pca as P

        print(f"no --pca: fitting PCA-whitening to {preset.aggregator.pca_dim} on {len(fit_on)} images")
        return P.fit_pca_whitening(B.describe_paths(no_pca, fit_on, args.batch, progress), preset=preset,
                                   source=f"map-specific: {args.images}", weights=weights_id, vocabulary=vocab)

    ref = build_reference(preset, args.weights, vocabulary=args.vocabulary, pca=args.pca, seed=args.seed,
                          fit_vocabulary=fit_vocabulary, fit_pca=fit_pca)
    desc = B.describe_paths(ref.model, paths, args.batch, progress)
    if args.output:
        with atomic_file(args.output) as fh:
            np.savez(fh, names=np.array([str(p) for p in paths]), descriptors=desc)
        print(f"wrote {len(desc)} descriptors ({desc.shape[1]}-d) to {args.output}")
    if ds:
        n_db = len(ds.database)
        ranked = fidelity.rank_database(desc[:n_db], desc[n_db:], 20)
        rec = fidelity.recall_at_k(ranked, ds.positives, (1, 5, 10, 20))
        line = "  ".join(f"{k} {100 * v:.1f}" for k, v in rec.items())
        print(f"{preset.name} ({args.weights} weights) on {ds.name}: {len(ds.queries)} queries, {n_db} database: {line}")
        if args.output is None:
            print(json.dumps({"preset": preset.name, "weights": args.weights, "dataset": ds.name, **rec}))
    return 0
