"""Descriptor space vs identity: what makes descriptors comparable, apart from who produced them.

- The **space** is the definition of a descriptor a database was built in: the preset whose recipe
  defines it (for a student: its teacher's), the feature recipe (backbone architecture, facet block and
  layout, input size), the identity of the weights that *define* the features (the teacher's), the
  aggregator, the descriptor size and the fingerprints of the vocabulary and PCA. Two descriptors
  can be compared (by a map, a vocabulary, a PCA, a benchmark, a fidelity check) exactly when their
  spaces agree; `differences` is the one function that decides it, at one of three levels:
    'features'    what a vocabulary is fitted on (feature recipe + weights),
    'aggregate'   what a PCA is fitted on (+ aggregator before PCA + vocabulary),
    'descriptors' what maps and benchmarks compare (everything).
- The **identity** is the network that produced the numbers: its preset or student config, its own
  weights, precision, scope and engine. It is recorded (a map holds descriptors of one identity), but
  it never decides whether descriptors are comparable: a ViT-S student that declares the ViT-G
  teacher's space queries the teacher's map.

Weights are identified by `weights_id`: `sha256:<hex>` of a checkpoint file, or `random:seed=<n>`
for seeded random weights (each seed is another network). Manifests of format 1 recorded the literal
"random"/"auto"; they migrate to `legacy:random` / `legacy:auto`, which compare equal only to
themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vpr_edge.errors import ArtifactError
from vpr_edge.presets import Preset

LEVELS = ("features", "aggregate", "descriptors")
_LEVEL_KEYS = {
    "features": ("features", "weights"),
    "aggregate": ("features", "weights", "aggregator", "vocabulary"),
    "descriptors": ("preset", "features", "weights", "aggregator", "descriptor_dim", "vocabulary", "pca"),
}
RANDOM_INIT = "random"  # weights-id scheme of vpr-edge's seeded init (models.weights.init_random_)


def random_weights_id(seed: int, kind: str = RANDOM_INIT) -> str:
    """`random:seed=N`, or `random-outliers:seed=N` for the outlier stress model (another network)."""
    return f"{kind}:seed={int(seed)}"


def file_weights_id(sha256: str) -> str:
    return f"sha256:{sha256}"


def _plain(x: Any) -> Any:
    """Tuples -> lists, as after a JSON round trip, so in-memory and loaded records compare equal."""
    return json.loads(json.dumps(x))


def feature_recipe(preset: Preset) -> dict[str, Any]:
    """What the per-patch features are: backbone architecture (not its weights), facet, input size."""
    return _plain(
        {
            "backbone": dataclasses.asdict(preset.backbone) | {"weights": None},
            "facet": dataclasses.asdict(preset.facet) if preset.facet else None,
            "image_size": list(preset.preprocess.image_size),
        }
    )


def aggregator_recipe(preset: Preset) -> dict[str, Any]:
    return _plain(dataclasses.asdict(preset.aggregator) | {"weights": None})


@dataclass(frozen=True)
class DescriptorSpace:
    preset: str  # base name of the preset whose recipe defines the space ('@tiny' kept)
    features: dict
    weights: str  # weights id of the network that defines the features
    aggregator: dict
    descriptor_dim: int
    vocabulary: str | None = None  # content fingerprint of the VLAD centres
    pca: str | None = None  # content fingerprint of the PCA arrays

    @classmethod
    def of(cls, preset: Preset, weights: str, vocabulary: str | None = None, pca: str | None = None) -> "DescriptorSpace":
        return cls(
            preset=preset.name if not preset.tiny_of else f"{preset.tiny_of}@tiny",
            features=feature_recipe(preset),
            weights=weights,
            aggregator=aggregator_recipe(preset),
            descriptor_dim=int(preset.descriptor_dim),
            vocabulary=vocabulary,
            pca=pca,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": "vpr-edge-space", "version": 1, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> "DescriptorSpace":
        try:
            return cls(**{f.name: d[f.name] if f.name in d else None for f in dataclasses.fields(cls)})
        except TypeError as exc:
            raise ArtifactError(f"{source}: malformed descriptor space ({exc}); re-create the artifact") from None


@dataclass(frozen=True)
class Identity:
    """Who produced the numbers (recorded; never what decides comparability)."""

    network: str  # preset name, or 'student:<name>' for a distilled student
    backbone: str  # e.g. 'dinov2 vitg14'
    weights: str  # weights id of this network
    precision: str = "fp32"
    scope: str = "descriptor"
    engine: str | None = None  # e.g. 'tensorrt 10.3.0 sm_8.7' for engine artifacts
    preprocess: str = "exact"

    @classmethod
    def of(cls, preset: Preset, weights: str, **kw: Any) -> "Identity":
        return cls(network=preset.name, backbone=f"{preset.backbone.family} {preset.backbone.arch}", weights=weights, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Identity":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def key(self) -> str:
        """A short stable id of this identity (what a map records per build)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        eng = f", {self.engine}" if self.engine else ""
        return f"{self.network} ({self.backbone}, weights {short_id(self.weights)}, {self.precision}, {self.scope}{eng})"


def short_id(weights_or_fp: str | None) -> str:
    if not weights_or_fp:
        return "none"
    scheme, sep, rest = str(weights_or_fp).partition(":")
    if sep and scheme == "sha256":
        return f"sha256:{rest[:12]}"
    return str(weights_or_fp)[:40] if sep else str(weights_or_fp)[:12]


def _as_dict(space: "DescriptorSpace | dict[str, Any] | None") -> dict[str, Any]:
    if space is None:
        return {}
    return space.to_dict() if isinstance(space, DescriptorSpace) else dict(space)


def _nested(key: str, a: Any, b: Any, limit: int = 4) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(a.keys() | b.keys()):
            out.extend(_nested(f"{key}.{k}", a.get(k), b.get(k), limit))
        return out[:limit] + ([f"{key}: {len(out) - limit} more"] if len(out) > limit else [])
    if a == b:
        return []
    if key in ("weights", "vocabulary", "pca"):
        return [f"{key} {short_id(a)} vs {short_id(b)}"]
    return [f"{key} {a!r} vs {b!r}"]


def differences(have: Any, want: Any, level: str = "descriptors") -> list[str]:
    """Why descriptors in space `have` cannot be used where space `want` is expected (empty: they can).

    A key that one side does not record (an imported AnyLoc vocabulary has no provenance) is not
    compared; at level 'aggregate' the PCA size is not part of the aggregator."""
    if level not in _LEVEL_KEYS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    a, b = _as_dict(have), _as_dict(want)
    out: list[str] = []
    for key in _LEVEL_KEYS[level]:
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        if level == "aggregate" and key == "aggregator":
            x, y = dict(x, pca_dim=None), dict(y, pca_dim=None)
        out.extend(_nested(key, _plain(x), _plain(y)))
    return out


def require_same(have: Any, want: Any, *, have_name: str, want_name: str, level: str = "descriptors",
                 fix: str = "") -> None:
    """Refuse with one line naming both sides when `differences` finds any."""
    diffs = differences(have, want, level)
    if diffs:
        raise ArtifactError(
            f"{have_name} and {want_name} are in different descriptor spaces ({'; '.join(diffs[:6])})"
            + (f"; {fix}" if fix else "")
        )


# -- format-1 manifests ---------------------------------------------------------------------------
def _legacy_weights(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    if value in ("random", "auto"):
        return f"legacy:{value}"
    return file_weights_id(value) if ":" not in value else value


def migrate_space(old: dict[str, Any], hashes: dict[str, Any]) -> dict[str, Any]:
    """A format-1 `space` (Preset.space() of then) plus its `hashes` -> a DescriptorSpace dict."""
    name = old.get("preset", "")
    if old.get("tiny") and name and not name.endswith("@tiny"):
        name = f"{name}@tiny"
    return DescriptorSpace(
        preset=name,
        features=_plain({"backbone": old.get("backbone"), "facet": old.get("facet"), "image_size": old.get("image_size")}),
        weights=_legacy_weights(hashes.get("weights")),
        aggregator=_plain(old.get("aggregator")),
        descriptor_dim=old.get("descriptor_dim"),
        vocabulary=hashes.get("vocabulary"),
        pca=hashes.get("pca"),
    ).to_dict()
